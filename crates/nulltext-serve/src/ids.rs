//! Identifiers of jobs, inversions and edits: 128 random bits written as 32 lowercase hex
//! digits. A client's string becomes an [`Id`] only through [`Id::parse`], which accepts
//! nothing else, so no client-supplied text ever reaches a file path.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(u128);

impl Id {
    pub const LEN: usize = 32;

    /// A fresh random id.
    pub fn random() -> Self {
        Id(rand::random())
    }

    /// Exactly 32 characters of `0-9a-f`; anything else is refused.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != Self::LEN || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Id)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Id::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not an id")))
    }
}

#[cfg(test)]
mod tests {
    use super::Id;

    #[test]
    fn round_trips_and_refuses_everything_else() {
        let id = Id::random();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(Id::parse(&s), Some(id));
        assert_eq!(
            Id::parse("0000000000000000000000000000000a")
                .unwrap()
                .to_string()
                .len(),
            32
        );
        for bad in [
            "",
            "../../etc/passwd",
            "..%2F..%2Fetc",
            "0000000000000000000000000000000A",
            "0000000000000000000000000000000",
            "00000000000000000000000000000000a",
            "+0000000000000000000000000000000",
            "0000000000000000/000000000000000",
            "000000000000000000000000000000é",
        ] {
            assert_eq!(Id::parse(bad), None, "{bad:?}");
        }
    }
}
