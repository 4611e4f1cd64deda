use std::ops::Bound;

use engine::module::{fail, stage, Module, ModuleBuilder, ModuleDef, Partitioner, To};
use engine::pstate::{Nav, Op, PStateSchema, ValueSchema};
use engine::value::{Kind, Value};
use engine::Result;

/// Counts words of sentences appended to `*sentences`.
#[derive(Debug)]
pub struct WordCountModule;

/// The words of a sentence: maximal runs of alphanumeric characters,
/// lowercased.
pub fn words(sentence: &str) -> impl Iterator<Item = String> + '_ {
    sentence
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// `[word, count]` pairs, most frequent first (ties by word), at most `n`.
fn top(mut counts: Vec<(String, i64)>, n: usize) -> Vec<(String, i64)> {
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.truncate(n);
    counts
}

fn pairs(v: &Value) -> Result<Vec<(String, i64)>> {
    let Value::List(items) = v else {
        return Err(fail(format!("expected a list of [word, count], got {v:?}")));
    };
    items
        .iter()
        .map(|p| match p {
            Value::List(wc) if wc.len() == 2 => Ok((
                wc[0].as_str().unwrap_or_default().to_string(),
                wc[1].as_int().unwrap_or_default(),
            )),
            _ => Err(fail(format!("expected [word, count], got {p:?}"))),
        })
        .collect()
}

fn as_list(counts: Vec<(String, i64)>) -> Value {
    Value::List(
        counts
            .into_iter()
            .map(|(w, c)| Value::list([Value::from(w), Value::Int(c)]))
            .collect(),
    )
}

fn limit(args: &Value) -> Result<usize> {
    match args.as_int() {
        Some(n) if (1..=10_000).contains(&n) => Ok(n as usize),
        _ => Err(fail(format!(
            "topWords takes the number of words (1..=10000), got {args:?}"
        ))),
    }
}

impl Module for WordCountModule {
    fn define() -> Result<ModuleDef> {
        ModuleBuilder::new("WordCountModule")
            .depot("*sentences", Partitioner::Random)
            .pstate(
                "$$wordCounts",
                PStateSchema::new(ValueSchema::Scalar(Kind::Str), ValueSchema::Scalar(Kind::Int)),
            )
            .stream(
                "wordCount",
                ["*sentences"],
                vec![
                    stage(|ctx, sentence| {
                        let s = sentence
                            .as_str()
                            .ok_or_else(|| fail(format!("a sentence must be a string, got {sentence:?}")))?;
                        for w in words(s) {
                            ctx.emit(To::Hash(Value::from(w.as_str())), Value::from(w));
                        }
                        Ok(())
                    }),
                    stage(|ctx, word| {
                        ctx.transform(
                            "$$wordCounts",
                            &[Nav::Key(word)],
                            Op::update(|n| Value::Int(n.as_int().unwrap_or(0) + 1)),
                        )
                    }),
                ],
            )
            .query(
                "topWords",
                vec![
                    stage(|ctx, args| {
                        limit(&args)?;
                        ctx.emit(To::All, args);
                        Ok(())
                    }),
                    stage(|ctx, args| {
                        let n = limit(&args)?;
                        let all = ctx.select_one("$$wordCounts", &[Nav::range(Bound::Unbounded, Bound::Unbounded)])?;
                        let counts = all
                            .as_map()
                            .map(|m| {
                                m.iter()
                                    .map(|(w, c)| (w.as_str().unwrap_or_default().to_string(), c.as_int().unwrap_or(0)))
                                    .collect()
                            })
                            .unwrap_or_default();
                        ctx.emit(To::Origin, as_list(top(counts, n)));
                        Ok(())
                    }),
                ],
                |args, parts| {
                    let mut all = Vec::new();
                    for p in &parts {
                        all.extend(pairs(p)?);
                    }
                    Ok(as_list(top(all, limit(args)?)))
                },
            )
            .build()
    }
}
