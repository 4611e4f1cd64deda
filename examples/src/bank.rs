use engine::module::{fail, stage, Module, ModuleBuilder, ModuleDef, To};
use engine::pstate::{Nav, Op, PStateSchema, ValueSchema};
use engine::value::{Kind, Value};
use engine::Result;

use crate::{by_field, field, int_field};

/// Accounts with deposits and transfers, processed exactly once by a
/// microbatch topology.
///
/// - `*deposits`: `{"account": string, "amount": int}`, by account.
/// - `*transfers`: `{"id": int, "from": string, "to": string, "amount": int}`,
///   by source account. A transfer that would overdraw its source (or moves
///   a non-positive amount) is rejected and its id recorded under the source
///   account in `$$rejectedTransfers`.
/// - `$$funds`: account -> balance.
/// - query `totalFunds` (no arguments): the sum of all balances.
#[derive(Debug)]
pub struct BankTransferModule;

fn add(amount: i64) -> Op {
    Op::update(move |b| Value::Int(b.as_int().unwrap_or(0) + amount))
}

fn account(record: &Value, name: &str) -> Result<Value> {
    let a = field(record, name)?;
    if a.as_str().is_none() {
        return Err(fail(format!("field {name:?} of {record:?} is not a string")));
    }
    Ok(a.clone())
}

impl Module for BankTransferModule {
    fn define() -> Result<ModuleDef> {
        ModuleBuilder::new("BankTransferModule")
            .depot("*deposits", by_field("account"))
            .depot("*transfers", by_field("from"))
            .pstate(
                "$$funds",
                PStateSchema::new(ValueSchema::Scalar(Kind::Str), ValueSchema::Scalar(Kind::Int)),
            )
            .pstate(
                "$$rejectedTransfers",
                PStateSchema::new(
                    ValueSchema::Scalar(Kind::Str),
                    ValueSchema::subindexed_set(ValueSchema::Scalar(Kind::Int)),
                ),
            )
            .microbatch(
                "banking",
                ["*deposits", "*transfers"],
                vec![
                    stage(|ctx, record| {
                        if ctx.source() == Some("*deposits") {
                            let amount = int_field(&record, "amount")?;
                            return ctx.transform("$$funds", &[Nav::Key(account(&record, "account")?)], add(amount));
                        }
                        let (id, amount) = (int_field(&record, "id")?, int_field(&record, "amount")?);
                        let (from, to) = (account(&record, "from")?, account(&record, "to")?);
                        let balance = ctx
                            .select_one("$$funds", &[Nav::Key(from.clone())])?
                            .as_int()
                            .unwrap_or(0);
                        if amount <= 0 || balance < amount {
                            return ctx.transform(
                                "$$rejectedTransfers",
                                &[Nav::Key(from), Nav::Key(Value::Int(id))],
                                Op::Set(Value::Int(id)),
                            );
                        }
                        ctx.transform("$$funds", &[Nav::Key(from)], add(-amount))?;
                        ctx.emit(To::Hash(to.clone()), Value::list([to, Value::Int(amount)]));
                        Ok(())
                    }),
                    stage(|ctx, credit| {
                        let Value::List(parts) = credit else {
                            return Err(fail("a credit is [account, amount]"));
                        };
                        let amount = parts[1].as_int().unwrap_or(0);
                        ctx.transform("$$funds", &[Nav::Key(parts[0].clone())], add(amount))
                    }),
                ],
            )
            .query(
                "totalFunds",
                vec![
                    stage(|ctx, args| {
                        ctx.emit(To::All, args);
                        Ok(())
                    }),
                    stage(|ctx, _| {
                        let sum: i64 = ctx
                            .select("$$funds", &[Nav::MapVals])?
                            .iter()
                            .map(|b| b.as_int().unwrap_or(0))
                            .sum();
                        ctx.emit(To::Origin, Value::Int(sum));
                        Ok(())
                    }),
                ],
                |_, parts| Ok(Value::Int(parts.iter().map(|p| p.as_int().unwrap_or(0)).sum())),
            )
            .build()
    }
}
