//! Merging sorted sources where a newer source shadows an older one.

use std::iter::Peekable;

use crate::error::Result;

/// A sorted source of entries; `None` values are tombstones.
pub(crate) type Source<'a> = Box<dyn Iterator<Item = Result<(&'a [u8], Option<&'a [u8]>)>> + 'a>;

/// Yields each key once, from the newest source that has it (sources are
/// given newest first), in ascending or (with `reverse`) descending order.
/// Tombstones are yielded too; callers decide whether to drop them.
pub(crate) struct Merge<'a> {
    sources: Vec<Peekable<Source<'a>>>,
    reverse: bool,
}

impl<'a> Merge<'a> {
    pub(crate) fn new(sources: Vec<Source<'a>>, reverse: bool) -> Self {
        Merge {
            sources: sources.into_iter().map(Iterator::peekable).collect(),
            reverse,
        }
    }
}

impl<'a> Iterator for Merge<'a> {
    type Item = Result<(&'a [u8], Option<&'a [u8]>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut best: Option<(usize, &'a [u8])> = None;
        for (i, source) in self.sources.iter_mut().enumerate() {
            match source.peek() {
                None => {}
                Some(Err(_)) => return source.next(),
                Some(Ok((key, _))) => {
                    let better = match best {
                        None => true,
                        Some((_, b)) => {
                            if self.reverse {
                                *key > b
                            } else {
                                *key < b
                            }
                        }
                    };
                    if better {
                        best = Some((i, key));
                    }
                }
            }
        }
        let (winner, key) = best?;
        let item = self.sources[winner].next();
        // Older sources' entries for the same key are shadowed.
        for source in &mut self.sources[winner + 1..] {
            if matches!(source.peek(), Some(Ok((k, _))) if *k == key) {
                source.next();
            }
        }
        item
    }
}
