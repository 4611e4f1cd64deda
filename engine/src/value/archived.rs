//! The rkyv archived form of [`Value`]: read in place, without copying.
//!
//! The workspace builds rkyv with `unaligned`, `little_endian` and
//! `pointer_width_32`, so an archive can be read at any byte position (inside
//! an mmapped table block or a network frame) and is the same on every host.
//! Archives are validated (bytecheck) before they are read: corrupt or hostile
//! bytes give an error, never undefined behaviour.

use rkyv::rancor;

use super::{ArchivedValue, Value};

/// An archive that failed validation.
#[derive(Debug, thiserror::Error)]
#[error("invalid archived value: {0}")]
pub struct ArchiveError(String);

/// Returns the archived bytes of `value`.
pub fn to_bytes(value: &Value) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(value)
        .expect("serializing a Value to memory cannot fail")
        .into_vec()
}

/// Validates `bytes` and returns a view of the archived value in place.
pub fn access(bytes: &[u8]) -> Result<&ArchivedValue, ArchiveError> {
    rkyv::access::<ArchivedValue, rancor::Error>(bytes).map_err(|e| ArchiveError(e.to_string()))
}

/// Validates `bytes` and deserializes an owned [`Value`].
pub fn from_bytes(bytes: &[u8]) -> Result<Value, ArchiveError> {
    let archived = access(bytes)?;
    rkyv::deserialize::<Value, rancor::Error>(archived).map_err(|e| ArchiveError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::strategy;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(v in strategy::value()) {
            prop_assert_eq!(from_bytes(&to_bytes(&v)).unwrap(), v);
        }

        #[test]
        fn readable_at_any_alignment(v in strategy::value(), shift in 0usize..8) {
            let bytes = to_bytes(&v);
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(&bytes);
            prop_assert_eq!(from_bytes(&shifted[shift..]).unwrap(), v);
        }

        #[test]
        fn garbage_is_an_error_not_a_crash(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = from_bytes(&bytes);
        }
    }

    #[test]
    fn archived_map_is_read_in_place() {
        let v = Value::map([("a", 1), ("b", 2)]);
        let bytes = to_bytes(&v);
        match access(&bytes).unwrap() {
            ArchivedValue::Map(entries) => {
                assert_eq!(entries.len(), 2);
                assert!(matches!(entries[1].value, ArchivedValue::Int(i) if i == 2));
            }
            other => panic!(
                "expected a map, got a different kind: {:?}",
                std::mem::discriminant(other)
            ),
        }
    }
}
