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

/// Subtree ranges the validator may hold open at once: one per nesting
/// level of lists, maps and sets (their element vectors), two for the root
/// and one for a leaf's out-of-line bytes (measured: `DEPTH_MAX` levels
/// around a long string need exactly this many).
const SUBTREE_DEPTH_MAX: usize = super::DEPTH_MAX + 3;

/// Validates `bytes` and returns a view of the archived value in place.
///
/// Nesting deeper than [`super::DEPTH_MAX`] is refused during validation,
/// before any recursion deeper than that: validation, deserialization and
/// drop all recurse once per level, and a hostile archive a few hundred
/// kilobytes long once nested deep enough to overflow a thread's stack.
pub fn access(bytes: &[u8]) -> Result<&ArchivedValue, ArchiveError> {
    let mut validator = rkyv::validation::Validator::new(
        rkyv::validation::archive::ArchiveValidator::with_max_depth(
            bytes,
            std::num::NonZeroUsize::new(SUBTREE_DEPTH_MAX),
        ),
        rkyv::validation::shared::SharedValidator::new(),
    );
    rkyv::api::access_with_context::<ArchivedValue, _, rancor::Error>(bytes, &mut validator).map_err(|e| {
        ArchiveError(format!(
            "corrupt, or values nest deeper than {} levels ({e})",
            super::DEPTH_MAX
        ))
    })
}

/// Validates `bytes` and deserializes an owned [`Value`].
pub fn from_bytes(bytes: &[u8]) -> Result<Value, ArchiveError> {
    let archived = access(bytes)?;
    rkyv::deserialize::<Value, rancor::Error>(archived).map_err(|e| ArchiveError(e.to_string()))
}

/// Levels a message may add around the values it carries (an enum, a
/// struct, a vector of pairs, a path step, a bound).
pub const MESSAGE_DEPTH_MAX: usize = 8;

/// The validator of messages (see [`access_as`] for its depth bound).
pub type Validator<'a> = rkyv::validation::Validator<
    rkyv::validation::archive::ArchiveValidator<'a>,
    rkyv::validation::shared::SharedValidator,
>;

/// The serializer [`encode`] uses.
pub type Serializer<'a> =
    rkyv::api::high::HighSerializer<rkyv::util::AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>;

/// The archived bytes of any message type of the vocabulary
/// (`engine::wire`): written once by the sender, read in place by the
/// receiver with [`access_as`].
pub fn encode<T: for<'a> rkyv::Serialize<Serializer<'a>>>(message: &T) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(message)
        .expect("serializing a message to memory cannot fail")
        .into_vec()
}

/// Validates `bytes` as an archived `T` and returns it in place. Values
/// inside nest at most [`super::DEPTH_MAX`] + [`MESSAGE_DEPTH_MAX`] levels
/// (the message's own structure is counted with them), so no decoder
/// recurses deeper; anything corrupt, truncated or hostile is an error
/// before a byte of it is used.
pub fn access_as<T>(bytes: &[u8]) -> Result<&T, ArchiveError>
where
    T: rkyv::Portable + for<'a> rkyv::bytecheck::CheckBytes<rancor::Strategy<Validator<'a>, rancor::Error>>,
{
    let mut validator = rkyv::validation::Validator::new(
        rkyv::validation::archive::ArchiveValidator::with_max_depth(
            bytes,
            std::num::NonZeroUsize::new(SUBTREE_DEPTH_MAX + MESSAGE_DEPTH_MAX),
        ),
        rkyv::validation::shared::SharedValidator::new(),
    );
    rkyv::api::access_with_context::<T, _, rancor::Error>(bytes, &mut validator).map_err(|e| {
        ArchiveError(format!(
            "a {} that is corrupt, or whose values nest deeper than {} levels ({e})",
            std::any::type_name::<T>().rsplit("::").next().unwrap_or("message"),
            super::DEPTH_MAX
        ))
    })
}

/// An owned `T` made from its archived form (read in place from a
/// validated message).
pub fn to_owned<T>(archived: &T::Archived) -> Result<T, ArchiveError>
where
    T: rkyv::Archive,
    T::Archived: rkyv::Deserialize<T, rancor::Strategy<rkyv::de::Pool, rancor::Error>>,
{
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| ArchiveError(e.to_string()))
}

/// Validates `bytes` as an archived `T` and deserializes it.
pub fn decode_as<T>(bytes: &[u8]) -> Result<T, ArchiveError>
where
    T: rkyv::Archive,
    T::Archived: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rancor::Strategy<Validator<'a>, rancor::Error>>
        + rkyv::Deserialize<T, rancor::Strategy<rkyv::de::Pool, rancor::Error>>,
{
    let archived = access_as::<T::Archived>(bytes)?;
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| ArchiveError(e.to_string()))
}

/// The archive of `depth` nested one-element lists around nil, built
/// without recursion (serializing a value that deep would itself recurse
/// too far): the hostile input of the depth tests and fuzz seeds. rkyv
/// writes children before parents, every level is one archived value of
/// the same size whose relative pointer reaches the level before it, so
/// the bytes of one level repeat `depth` times.
pub fn deep_list_archive(depth: usize) -> Vec<u8> {
    let nested = |d: usize| to_bytes(&(0..d).fold(Value::Nil, |v, _| Value::List(vec![v])));
    let (a, b) = (nested(1), nested(2));
    let level = b.len() - a.len();
    let mut out = Vec::with_capacity(a.len() + level * depth);
    out.extend_from_slice(&a[..a.len() - level]);
    for _ in 0..depth {
        out.extend_from_slice(&b[b.len() - level..]);
    }
    out
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

    fn nested(depth: usize, leaf: Value) -> Value {
        (0..depth).fold(leaf, |v, _| Value::List(vec![v]))
    }

    #[test]
    fn nesting_up_to_the_limit_is_read() {
        let leaf = Value::Str("a string too long to be stored inline".into());
        for v in [
            nested(crate::value::DEPTH_MAX, leaf.clone()),
            nested(crate::value::DEPTH_MAX - 1, Value::map([("k", leaf.clone())])),
        ] {
            assert_eq!(from_bytes(&to_bytes(&v)).unwrap(), v);
        }
    }

    /// Regression: a list nested 200,000 deep (1.8 MB) in one request
    /// overflowed a worker's stack during validation.
    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let v = nested(crate::value::DEPTH_MAX + 2, Value::Nil);
        let e = from_bytes(&to_bytes(&v)).unwrap_err();
        assert!(e.to_string().contains("nest deeper than"), "{e}");
        // Built by hand: serializing a value this deep would itself recurse
        // too far. Each level is an archived list whose one element is the
        // level below; the bytes are a chain of relative pointers.
        // The construction is a real archive: without a depth limit it
        // validates.
        let shallow = super::deep_list_archive(1000);
        assert!(rkyv::access::<ArchivedValue, rancor::Error>(&shallow).is_ok());
        let deep = super::deep_list_archive(200_000);
        let t = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || access(&deep).map(|_| ()).map_err(|e| e.to_string()))
            .unwrap();
        let e = t
            .join()
            .expect("validation of a deep archive must not overflow a 256 KiB stack")
            .unwrap_err();
        assert!(e.contains("nest deeper than"), "{e}");
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
