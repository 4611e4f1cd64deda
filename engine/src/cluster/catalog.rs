//! The catalog: stable ids of a module's depots and PStates.
//!
//! Stored data never names an object by its position in the module
//! definition: PState keys carry the PState's id, stream offsets and
//! microbatch plans the depot's id, and depot partitions live in
//! directories named by id. The catalog maps names to ids. Each task
//! group's directory keeps a copy (`CATALOG`, beside its data, so a task
//! group's files are self-describing and can be taken over as they are);
//! it is checked when the module opens: a damaged catalog, one of another
//! module, or copies that disagree refuse the start.
//!
//! Ids are kept forever: an object the definition no longer has keeps its
//! id (its data stays until it is deleted explicitly), a new object takes
//! the next id of its kind (one above the highest ever given), in
//! definition order. Every task group of a module sees the same sequence
//! of definitions, so their catalogs agree.
//!
//! Format (text, one entry per line, names last so they may hold spaces):
//! ```text
//! rama catalog 1
//! module <name>
//! depot <id> <name>
//! pstate <id> <name>
//! crc32 <8 hex digits over every byte before this line>
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The catalog's file name inside a task group's directory.
pub const FILE: &str = "CATALOG";
const HEADER: &str = "rama catalog 1";

/// Names to ids of one module's depots and PStates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub module: String,
    pub depots: BTreeMap<String, u16>,
    pub pstates: BTreeMap<String, u16>,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        position: 0,
        reason: reason.into(),
    }
}

impl Catalog {
    /// The text of the catalog file.
    pub fn encode(&self) -> String {
        let mut text = format!("{HEADER}\nmodule {}\n", self.module);
        for (name, id) in &self.depots {
            text.push_str(&format!("depot {id} {name}\n"));
        }
        for (name, id) in &self.pstates {
            text.push_str(&format!("pstate {id} {name}\n"));
        }
        let crc = crc32fast::hash(text.as_bytes());
        text.push_str(&format!("crc32 {crc:08x}\n"));
        text
    }

    /// Parses and checks a catalog file's text (`path` names it in
    /// errors).
    pub fn decode(path: &Path, text: &str) -> Result<Catalog> {
        let body_end = text
            .rfind("crc32 ")
            .ok_or_else(|| corrupt(path, "catalog: no crc32 line (truncated?)"))?;
        let (body, crc_line) = text.split_at(body_end);
        let want = crc_line
            .trim_end()
            .strip_prefix("crc32 ")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| corrupt(path, "catalog: bad crc32 line"))?;
        let got = crc32fast::hash(body.as_bytes());
        if got != want {
            return Err(corrupt(
                path,
                format!("catalog: checksum {got:08x} does not match the stored {want:08x}"),
            ));
        }
        let mut lines = body.lines();
        if lines.next() != Some(HEADER) {
            return Err(corrupt(path, format!("catalog: the first line is not {HEADER:?}")));
        }
        let module = lines
            .next()
            .and_then(|l| l.strip_prefix("module "))
            .ok_or_else(|| corrupt(path, "catalog: no module line"))?
            .to_string();
        let mut catalog = Catalog {
            module,
            ..Catalog::default()
        };
        for line in lines {
            let mut parts = line.splitn(3, ' ');
            let (kind, id, name) = (parts.next(), parts.next(), parts.next());
            let (Some(kind), Some(id), Some(name)) = (kind, id, name) else {
                return Err(corrupt(path, format!("catalog: bad entry {line:?}")));
            };
            let id: u16 = id
                .parse()
                .ok()
                .filter(|&id| id < u16::MAX)
                .ok_or_else(|| corrupt(path, format!("catalog: bad id in {line:?} (0..=65534)")))?;
            let map = match kind {
                "depot" => &mut catalog.depots,
                "pstate" => &mut catalog.pstates,
                _ => return Err(corrupt(path, format!("catalog: unknown kind in {line:?}"))),
            };
            if map.values().any(|&i| i == id) || map.insert(name.to_string(), id).is_some() {
                return Err(corrupt(
                    path,
                    format!("catalog: {kind} id {id} or name {name} is given twice"),
                ));
            }
        }
        Ok(catalog)
    }

    /// Reads the catalog at `path` (`None`: there is none yet).
    pub fn load(path: &Path) -> Result<Option<Catalog>> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| corrupt(path, "catalog: not UTF-8 text"))?;
                Catalog::decode(path, &text).map(Some)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    /// Writes the catalog to `path` durably: a temporary file, fsync,
    /// rename, fsync of the directory.
    pub fn store(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_durably(path, self.encode().as_bytes())
    }

    /// This catalog with ids for every name in `depots` and `pstates`
    /// (new names take the next id of their kind, in the order given).
    pub fn extended(&self, depots: &[&str], pstates: &[&str]) -> Result<Catalog> {
        let mut next = self.clone();
        for (map, names, kind) in [
            (&mut next.depots, depots, "depots"),
            (&mut next.pstates, pstates, "PStates"),
        ] {
            for name in names {
                if !map.contains_key(*name) {
                    // 0xFFFF is reserved: runtime records (offsets,
                    // microbatch state) use it in the PState id's place.
                    let id = match map.values().max() {
                        None => 0,
                        Some(&max) => max.checked_add(1).filter(|&id| id < u16::MAX).ok_or_else(|| {
                            Error::Schema(format!("module {} has used up the 65535 ids of {kind}", self.module))
                        })?,
                    };
                    map.insert((*name).to_string(), id);
                }
            }
        }
        Ok(next)
    }
}

/// The catalog of `module` with ids for the objects named, from the
/// catalogs in `dirs` (the task groups' directories this process opens):
/// the copies found must agree and name `module`; the result is written
/// to every directory whose copy is missing or older. Runs before any
/// storage of the module opens.
pub fn open(module: &str, dirs: &[PathBuf], depots: &[&str], pstates: &[&str]) -> Result<Catalog> {
    let mut found: Option<(PathBuf, Catalog)> = None;
    for dir in dirs {
        let path = dir.join(FILE);
        let Some(c) = Catalog::load(&path)? else { continue };
        if c.module != module {
            return Err(corrupt(
                &path,
                format!("catalog: belongs to module {}, not {module}", c.module),
            ));
        }
        match &found {
            Some((first, f)) if *f != c => {
                return Err(corrupt(
                    &path,
                    format!(
                        "catalog: disagrees with {} (depots {:?} vs {:?}, PStates {:?} vs {:?}); the task groups' \
                         files do not belong together",
                        first.display(),
                        c.depots,
                        f.depots,
                        c.pstates,
                        f.pstates
                    ),
                ))
            }
            Some(_) => {}
            None => found = Some((path, c)),
        }
    }
    let base = found.map(|(_, c)| c).unwrap_or_else(|| Catalog {
        module: module.to_string(),
        ..Catalog::default()
    });
    let catalog = base.extended(depots, pstates)?;
    for dir in dirs {
        let path = dir.join(FILE);
        if Catalog::load(&path)?.as_ref() != Some(&catalog) {
            catalog.store(&path)?;
        }
    }
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_across_definitions_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let tgs: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("tg-{i}"))).collect();
        let c = open("M", &tgs, &["*a", "*b"], &["$$p"]).unwrap();
        assert_eq!(c.depots["*a"], 0);
        assert_eq!(c.depots["*b"], 1);
        assert_eq!(c.pstates["$$p"], 0);
        // A later definition: a PState added before the old one, a depot
        // gone. Old ids stay, the new PState takes the next id.
        let c2 = open("M", &tgs, &["*b"], &["$$new", "$$p"]).unwrap();
        assert_eq!(c2.pstates["$$p"], 0);
        assert_eq!(c2.pstates["$$new"], 1);
        assert_eq!(c2.depots["*a"], 0, "a removed depot keeps its id");
        // ... and a depot added after that never reuses *a's id.
        let c3 = open("M", &tgs, &["*c"], &[]).unwrap();
        assert_eq!(c3.depots["*c"], 2);
        assert_eq!(Catalog::load(&tgs[1].join(FILE)).unwrap().unwrap(), c3);
    }

    #[test]
    fn damage_and_strangers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tgs: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("tg-{i}"))).collect();
        open("M", &tgs, &["*a"], &["$$p with space"]).unwrap();
        let path = tgs[0].join(FILE);
        let good = std::fs::read_to_string(&path).unwrap();
        assert!(good.contains("pstate 0 $$p with space\n"), "{good}");
        // One flipped byte.
        std::fs::write(&path, good.replace("depot 0", "depot 7")).unwrap();
        let e = open("M", &tgs, &["*a"], &[]).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("CATALOG"), "{e}");
        // Truncated.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(open("M", &tgs, &["*a"], &[]).unwrap_err().to_string().contains("crc32"));
        // Another module's.
        std::fs::write(&path, &good).unwrap();
        let e = open("Other", &tgs, &["*a"], &[]).unwrap_err().to_string();
        assert!(e.contains("belongs to module M"), "{e}");
        // Copies that disagree.
        let other = Catalog {
            module: "M".into(),
            depots: [("*a".to_string(), 3)].into(),
            pstates: BTreeMap::new(),
        };
        other.store(&tgs[1].join(FILE)).unwrap();
        let e = open("M", &tgs, &["*a"], &[]).unwrap_err().to_string();
        assert!(e.contains("disagrees"), "{e}");
        // 0xFFFF is reserved for runtime records: never given, never read.
        let full = Catalog {
            module: "M".into(),
            depots: BTreeMap::new(),
            pstates: [("$$last".to_string(), u16::MAX - 1)].into(),
        };
        let e = full.extended(&[], &["$$one.more"]).unwrap_err().to_string();
        assert!(e.contains("used up"), "{e}");
        let reserved = "rama catalog 1\nmodule M\npstate 65535 $$p\n";
        let text = format!("{reserved}crc32 {:08x}\n", crc32fast::hash(reserved.as_bytes()));
        assert!(Catalog::decode(Path::new("x"), &text)
            .unwrap_err()
            .to_string()
            .contains("bad id"));
        // Duplicated ids are refused even with a good checksum.
        let dup = "rama catalog 1\nmodule M\ndepot 0 *a\ndepot 0 *b\n";
        let text = format!("{dup}crc32 {:08x}\n", crc32fast::hash(dup.as_bytes()));
        assert!(Catalog::decode(Path::new("x"), &text)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }
}
