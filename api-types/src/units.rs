//! Human-written quantities in specs: durations (`10s`, `1m30s`), memory sizes (`256Mi`, `512m`) and
//! CPU counts (`0.5`, `500m`). Each parses when the manifest is read, so a bad value is reported with
//! its file, line and field, and keeps the user's spelling when printed back.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A Go-style duration, as Docker and Swarm users write them: `300ms`, `10s`, `1m30s`, `2h`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duration {
    text: String,
    nanos: u64,
}

impl Duration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid duration `{s}`: expected e.g. `500ms`, `10s`, `1m30s`, `2h`");
        let t = s.trim();
        if t.is_empty() {
            return Err(bad());
        }
        if t == "0" {
            return Ok(Duration {
                text: s.to_string(),
                nanos: 0,
            });
        }
        let mut total: u128 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            if num_len == 0 {
                return Err(bad());
            }
            let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale: f64 = match &rest[..unit_len] {
                "ns" => 1.0,
                "us" | "µs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total += (value * scale).round() as u128;
        }
        let nanos = u64::try_from(total).map_err(|_| format!("duration `{s}` is too long"))?;
        Ok(Duration {
            text: s.to_string(),
            nanos,
        })
    }

    pub fn as_nanos(&self) -> u64 {
        self.nanos
    }

    pub fn from_nanos(nanos: u64) -> Self {
        Duration {
            text: format!("{}ms", nanos / 1_000_000),
            nanos,
        }
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(de::Error::custom)
    }
}

/// A size in bytes. Suffixes are binary, as in Docker (`512m` = 512 MiB) and Kubernetes (`512Mi`):
/// `k`/`Ki`, `m`/`Mi`, `g`/`Gi`, `t`/`Ti`, with an optional trailing `b`. A bare number is bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteSize {
    text: String,
    bytes: i64,
}

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid size `{s}`: expected bytes or a number with k, m, g, t (binary: 512m = 512Mi = 512 MiB)")
        };
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit = unit.to_ascii_lowercase();
        let unit = unit.strip_suffix('b').unwrap_or(&unit);
        let unit = unit.strip_suffix('i').unwrap_or(unit);
        let scale: f64 = match unit {
            "" => 1.0,
            "k" => 1024.0,
            "m" => 1024.0 * 1024.0,
            "g" => 1024.0 * 1024.0 * 1024.0,
            "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let bytes = value * scale;
        if !(bytes.is_finite() && bytes >= 0.0 && bytes < i64::MAX as f64) {
            return Err(bad());
        }
        Ok(ByteSize {
            text: s.to_string(),
            bytes: bytes.round() as i64,
        })
    }

    pub fn bytes(&self) -> i64 {
        self.bytes
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::Str(s) => ByteSize::parse(&s),
            StrOrNum::Num(n) => ByteSize::parse(&n.to_string()),
        }
        .map_err(de::Error::custom)
    }
}

/// A CPU count: `0.5`, `2`, or Kubernetes millicores `500m`. Stored as Swarm's nano-CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpus {
    text: String,
    nano: i64,
}

impl Cpus {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid CPU count `{s}`: expected e.g. `0.5`, `2` or `500m`");
        let t = s.trim();
        let cpus: f64 = match t.strip_suffix('m') {
            Some(milli) => milli.parse::<f64>().map_err(|_| bad())? / 1000.0,
            None => t.parse().map_err(|_| bad())?,
        };
        if !(cpus.is_finite() && cpus > 0.0 && cpus <= 4096.0) {
            return Err(format!(
                "invalid CPU count `{s}`: must be more than 0 and at most 4096"
            ));
        }
        Ok(Cpus {
            text: s.to_string(),
            nano: (cpus * 1e9).round() as i64,
        })
    }

    pub fn nano_cpus(&self) -> i64 {
        self.nano
    }
}

impl fmt::Display for Cpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Cpus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::Str(s) => Cpus::parse(&s),
            StrOrNum::Num(n) => Cpus::parse(&n.to_string()),
        }
        .map_err(de::Error::custom)
    }
}

/// YAML users write `cpus: 0.5` and `cpus: "0.5"` interchangeably.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or a number")]
enum StrOrNum {
    Str(String),
    Num(serde_json::Number),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Duration::parse("10s").unwrap().as_nanos(), 10_000_000_000);
        assert_eq!(Duration::parse("1m30s").unwrap().as_nanos(), 90_000_000_000);
        assert_eq!(Duration::parse("500ms").unwrap().as_nanos(), 500_000_000);
        assert_eq!(
            Duration::parse("1.5h").unwrap().as_nanos(),
            5_400_000_000_000
        );
        assert_eq!(Duration::parse("0").unwrap().as_nanos(), 0);
        for bad in ["", "10", "s", "10x", "1m30", "-1s", "ten seconds"] {
            let e = Duration::parse(bad).unwrap_err();
            assert!(e.starts_with("invalid duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_are_binary() {
        assert_eq!(ByteSize::parse("512").unwrap().bytes(), 512);
        assert_eq!(ByteSize::parse("64k").unwrap().bytes(), 65536);
        assert_eq!(ByteSize::parse("256m").unwrap().bytes(), 256 << 20);
        assert_eq!(ByteSize::parse("256Mi").unwrap().bytes(), 256 << 20);
        assert_eq!(ByteSize::parse("256MB").unwrap().bytes(), 256 << 20);
        assert_eq!(ByteSize::parse("1.5G").unwrap().bytes(), 3 << 29);
        for bad in ["", "m", "12q", "-5m", "1e400"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        let n: ByteSize = serde_json::from_str("1048576").unwrap();
        assert_eq!(n.bytes(), 1 << 20);
    }

    #[test]
    fn cpus() {
        assert_eq!(Cpus::parse("0.5").unwrap().nano_cpus(), 500_000_000);
        assert_eq!(Cpus::parse("250m").unwrap().nano_cpus(), 250_000_000);
        assert_eq!(Cpus::parse("2").unwrap().nano_cpus(), 2_000_000_000);
        assert!(Cpus::parse("0").is_err());
        assert!(Cpus::parse("lots").is_err());
        let n: Cpus = serde_json::from_str("1.5").unwrap();
        assert_eq!(n.nano_cpus(), 1_500_000_000);
    }
}
