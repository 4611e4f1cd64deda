use engine::module::{stage, Module, ModuleBuilder, ModuleDef, To};
use engine::pstate::{Nav, Op, PStateSchema, ValueSchema};
use engine::value::{Kind, Value};
use engine::Result;

use crate::{by_field, field, int_field};

/// Posts fanned out to followers' timelines.
///
/// - `*follows`: `{"follower": string, "followee": string}`, by followee.
/// - `*posts`: `{"author": string, "id": int, "text": string}`, by author.
/// - `$$followers`: user -> subindexed set of followers (on the user's task).
/// - `$$timelines`: user -> subindexed map post id -> post, sorted by id, so
///   a range path reads the newest posts.
#[derive(Debug)]
pub struct TimelineModule;

impl Module for TimelineModule {
    fn define() -> Result<ModuleDef> {
        ModuleBuilder::new("TimelineModule")
            .depot("*follows", by_field("followee"))
            .depot("*posts", by_field("author"))
            .pstate(
                "$$followers",
                PStateSchema::new(
                    ValueSchema::Scalar(Kind::Str),
                    ValueSchema::subindexed_set(ValueSchema::Scalar(Kind::Str)),
                ),
            )
            .pstate(
                "$$timelines",
                PStateSchema::new(
                    ValueSchema::Scalar(Kind::Str),
                    ValueSchema::subindexed_map(ValueSchema::Scalar(Kind::Int), ValueSchema::Any),
                ),
            )
            .stream(
                "follows",
                ["*follows"],
                vec![stage(|ctx, follow| {
                    let follower = field(&follow, "follower")?.clone();
                    let followee = field(&follow, "followee")?.clone();
                    ctx.transform(
                        "$$followers",
                        &[Nav::Key(followee), Nav::Key(follower.clone())],
                        Op::Set(follower),
                    )
                })],
            )
            .stream(
                "fanout",
                ["*posts"],
                vec![
                    stage(|ctx, post| {
                        int_field(&post, "id")?;
                        let author = field(&post, "author")?.clone();
                        for follower in ctx.select("$$followers", &[Nav::Key(author), Nav::All])? {
                            ctx.emit(To::Hash(follower.clone()), Value::list([follower, post.clone()]));
                        }
                        Ok(())
                    }),
                    stage(|ctx, delivery| {
                        let Value::List(mut parts) = delivery else {
                            return Err(engine::module::fail("a delivery is [follower, post]"));
                        };
                        let post = parts.pop().unwrap_or(Value::Nil);
                        let follower = parts.pop().unwrap_or(Value::Nil);
                        let id = int_field(&post, "id")?;
                        ctx.transform(
                            "$$timelines",
                            &[Nav::Key(follower), Nav::Key(Value::Int(id))],
                            Op::Set(post),
                        )
                    }),
                ],
            )
            .build()
    }
}
