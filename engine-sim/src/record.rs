//! How every object keeps its name and labels: one allocation per object,
//! with label keys (and image references) interned and reference-counted.
//!
//! A live [`Sym`] always resolves: each [`Record`] holds one interner
//! reference per label key until it is released.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// An interned string: a label key or an image reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Sym(u32);

/// Reference-counted interning of the few strings every object shares:
/// label keys and image references.
#[derive(Default)]
pub(super) struct Interner {
    entries: Vec<Option<Interned>>,
    free: Vec<u32>,
    index: HashMap<Arc<str>, Sym>,
}

struct Interned {
    text: Arc<str>,
    refs: u32,
}

impl Interner {
    pub(super) fn intern(&mut self, text: &str) -> Sym {
        if let Some(&sym) = self.index.get(text) {
            self.entry_mut(sym).refs += 1;
            return sym;
        }
        let text: Arc<str> = Arc::from(text);
        let entry = Interned {
            text: Arc::clone(&text),
            refs: 1,
        };
        let sym = match self.free.pop() {
            Some(free) => {
                self.entries[free as usize] = Some(entry);
                Sym(free)
            }
            None => {
                self.entries.push(Some(entry));
                Sym(u32::try_from(self.entries.len() - 1).expect("fewer than 2^32 strings"))
            }
        };
        self.index.insert(text, sym);
        sym
    }

    pub(super) fn release(&mut self, sym: Sym) {
        let entry = self.entry_mut(sym);
        entry.refs -= 1;
        if entry.refs == 0 {
            if let Some(gone) = self.entries[sym.0 as usize].take() {
                self.index.remove(&*gone.text);
            }
            self.free.push(sym.0);
        }
    }

    pub(super) fn resolve(&self, sym: Sym) -> &str {
        &self.entry(sym).text
    }

    fn entry(&self, sym: Sym) -> &Interned {
        self.entries[sym.0 as usize]
            .as_ref()
            .expect("a live symbol")
    }

    fn entry_mut(&mut self, sym: Sym) -> &mut Interned {
        self.entries[sym.0 as usize]
            .as_mut()
            .expect("a live symbol")
    }

    /// Number of distinct live strings.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }
}

/// A name and its labels in one allocation: how every object is stored.
///
/// Layout: `name_len: u32`, `count: u32`, `count` entries of `(key: Sym,
/// value_end: u32)` in key order (little-endian; ends are offsets into the
/// values), the name's bytes, then the values' bytes back to back. Keys are
/// few and shared by every object, so they are interned; values are mostly
/// the object's own (user id, spec hash) or tiny (`true`), so interning them
/// would cost more than it saves.
///
/// A record holds one interner reference per key, given back by
/// [`release`](Self::release) (or handed on by [`renamed`](Self::renamed)).
pub(super) struct Record(pub(super) Box<[u8]>);

impl Record {
    const HEADER: usize = 8;
    const ENTRY: usize = 8;

    pub(super) fn new(
        interner: &mut Interner,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let values: usize = labels.values().map(String::len).sum();
        let mut bytes =
            Vec::with_capacity(Self::HEADER + Self::ENTRY * labels.len() + name.len() + values);
        bytes.extend(word(name.len()));
        bytes.extend(word(labels.len()));
        let mut end = 0;
        for (key, value) in labels {
            end += value.len();
            bytes.extend(interner.intern(key).0.to_le_bytes());
            bytes.extend(word(end));
        }
        bytes.extend(name.as_bytes());
        for value in labels.values() {
            bytes.extend(value.as_bytes());
        }
        Self(bytes.into_boxed_slice())
    }

    /// The same labels under `name`; the interner references move to the new record.
    pub(super) fn renamed(self, name: &str) -> Self {
        let (head, _) = self.0.split_at(self.name_start());
        let values = &self.0[self.values_start()..];
        let mut bytes = Vec::with_capacity(head.len() + name.len() + values.len());
        bytes.extend(word(name.len()));
        bytes.extend(&head[4..]);
        bytes.extend(name.as_bytes());
        bytes.extend(values);
        Self(bytes.into_boxed_slice())
    }

    /// Gives back the record's interner references.
    pub(super) fn release(self, interner: &mut Interner) {
        for (key, _) in self.labels() {
            interner.release(key);
        }
    }

    pub(super) fn name(&self) -> &str {
        text(&self.0[self.name_start()..self.values_start()])
    }

    pub(super) fn label(&self, key: Sym) -> Option<&str> {
        self.labels()
            .find(|&(k, _)| k == key)
            .map(|(_, value)| value)
    }

    fn labels(&self) -> impl Iterator<Item = (Sym, &str)> + '_ {
        let values = &self.0[self.values_start()..];
        let mut begin = 0;
        (0..self.count()).map(move |index| {
            let at = Self::HEADER + Self::ENTRY * index;
            let end = self.read(at + 4) as usize;
            let value = text(&values[begin..end]);
            begin = end;
            (Sym(self.read(at)), value)
        })
    }

    pub(super) fn label_map(&self, interner: &Interner) -> BTreeMap<String, String> {
        self.labels()
            .map(|(key, value)| (interner.resolve(key).to_owned(), value.to_owned()))
            .collect()
    }

    fn read(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("four bytes"))
    }

    fn count(&self) -> usize {
        self.read(4) as usize
    }

    fn name_start(&self) -> usize {
        Self::HEADER + Self::ENTRY * self.count()
    }

    fn values_start(&self) -> usize {
        self.name_start() + self.read(0) as usize
    }
}

/// A length or offset as stored in a [`Record`].
fn word(n: usize) -> [u8; 4] {
    u32::try_from(n)
        .expect("labels smaller than 4 GiB")
        .to_le_bytes()
}

/// Bytes a [`Record`] copied from a `&str`, cut at the same boundaries.
fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("cut from a str at its boundaries")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_record_keeps_its_name_and_labels_through_a_rename() {
        let mut interner = Interner::default();
        let labels = BTreeMap::from([
            ("empty".to_owned(), String::new()),
            ("io.clawfleet.user-id".to_owned(), "Üser 1/ü".to_owned()),
            ("zeta".to_owned(), "last".to_owned()),
        ]);
        let record = Record::new(&mut interner, "mosaic-user-a", &labels);
        assert_eq!(record.name(), "mosaic-user-a");
        assert_eq!(record.label_map(&interner), labels);

        let renamed = record.renamed("mosaic-user-a-old-name");

        assert_eq!(renamed.name(), "mosaic-user-a-old-name");
        assert_eq!(renamed.label_map(&interner), labels);
        let key = interner.intern("zeta");
        assert_eq!(renamed.label(key), Some("last"));
        interner.release(key);
        renamed.release(&mut interner);
        assert_eq!(interner.len(), 0);
    }

    #[test]
    fn a_record_without_labels_is_just_its_name() {
        let mut interner = Interner::default();
        let record = Record::new(&mut interner, "vol", &BTreeMap::new());

        assert_eq!(record.name(), "vol");
        assert_eq!(record.labels().count(), 0);
        assert_eq!(record.0.len(), Record::HEADER + 3);
    }
}
