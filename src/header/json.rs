//! The raw serde structs of the JSON metadata area, and their conversion to and from the
//! validated [`Header`].
//!
//! These structs mirror the JSON exactly (`deny_unknown_fields` everywhere, hex strings left
//! as strings) and never leave this module: `decode` turns them into a `Header` and validates
//! it, so the rest of the crate only ever sees checked values. Parsing allocates in proportion
//! to the JSON, whose length is bounded (`COPY_AREA - 4096`) before it is read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Binding, Checkpoint, Cipher, Header, HeaderError, KeyDigest, KeySlot, FORMAT_VERSION, MAX_WRAPPED};
use crate::units::SectorSize;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetadata {
    uuid: String,
    cipher: String,
    key_bytes: u32,
    sector_size: u32,
    data_offset: u64,
    data_size: u64,
    key_digest: RawKeyDigest,
    mac: String,
    #[serde(deserialize_with = "nullable")]
    binding: Option<RawBinding>,
    slots: Vec<RawSlot>,
    #[serde(deserialize_with = "nullable")]
    reencrypt: Option<RawCheckpoint>,
    /// The one optional member: absent means false, and it is written only when true, so a
    /// version of nbdcrypt that does not know it refuses such a header (unknown field)
    /// instead of decrypting its zero sectors to noise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    zero_sectors: bool,
}

/// An `Option` that must be present (possibly `null`): serde would otherwise take a missing
/// field as `None`, and the format has no optional members.
fn nullable<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyDigest {
    alg: String,
    salt: String,
    value: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    volume_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlot {
    id: u32,
    provider: String,
    key_id: String,
    wrapped: String,
    context: BTreeMap<String, String>,
    created: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckpoint {
    kind: String,
    offset: u64,
    extra: BTreeMap<String, String>,
}

impl RawMetadata {
    pub(super) fn from_header(h: &Header) -> RawMetadata {
        RawMetadata {
            uuid: h.uuid.hyphenated().to_string(),
            cipher: h.cipher.name().to_owned(),
            key_bytes: h.cipher.key_bytes(),
            sector_size: h.sector_size.bytes(),
            data_offset: h.data_offset,
            data_size: h.data_size,
            key_digest: RawKeyDigest {
                alg: KeyDigest::ALG.to_owned(),
                salt: hex::encode(h.key_digest.salt),
                value: hex::encode(h.key_digest.value),
            },
            mac: hex::encode(h.mac),
            binding: h.binding.as_ref().map(|b| RawBinding { volume_id: b.volume_id.clone() }),
            slots: h
                .slots
                .iter()
                .map(|s| RawSlot {
                    id: s.id,
                    provider: s.provider.clone(),
                    key_id: s.key_id.clone(),
                    wrapped: hex::encode(&s.wrapped),
                    context: s.context.clone(),
                    created: s.created,
                })
                .collect(),
            reencrypt: h.checkpoint.as_ref().map(|c| RawCheckpoint {
                kind: c.kind.clone(),
                offset: c.offset,
                extra: c.extra.clone(),
            }),
            zero_sectors: h.zero_sectors,
        }
    }

    /// Converts to a `Header` (version and seq come from the binary block) and validates it.
    pub(super) fn into_header(self, seq: u64) -> Result<Header, HeaderError> {
        let uuid = parse_uuid(&self.uuid)?;
        let cipher = Cipher::from_name(&self.cipher).ok_or(HeaderError::UnsupportedCipher(self.cipher))?;
        if self.key_bytes != cipher.key_bytes() {
            return Err(field(
                "key_bytes",
                format!("{} does not fit {cipher} (needs {})", self.key_bytes, cipher.key_bytes()),
            ));
        }
        let sector_size = SectorSize::new(self.sector_size)
            .ok_or_else(|| field("sector_size", format!("{} is not 512 or 4096", self.sector_size)))?;
        if self.key_digest.alg != KeyDigest::ALG {
            return Err(field("key_digest.alg", format!("{:?} is not {:?}", self.key_digest.alg, KeyDigest::ALG)));
        }
        let key_digest = KeyDigest {
            salt: hex32("key_digest.salt", &self.key_digest.salt)?,
            value: hex32("key_digest.value", &self.key_digest.value)?,
        };
        let mac = hex32("mac", &self.mac)?;
        let mut slots = Vec::with_capacity(self.slots.len());
        for (i, s) in self.slots.into_iter().enumerate() {
            // Bound the hex string before decoding it (the decode allocates half its length).
            if s.wrapped.len() > 2 * MAX_WRAPPED {
                return Err(field(
                    &format!("slots[{i}].wrapped"),
                    format!("{} hex digits, more than {}", s.wrapped.len(), 2 * MAX_WRAPPED),
                ));
            }
            let wrapped =
                hex::decode(&s.wrapped).map_err(|e| field(&format!("slots[{i}].wrapped"), format!("not hex: {e}")))?;
            slots.push(KeySlot {
                id: s.id,
                provider: s.provider,
                key_id: s.key_id,
                wrapped,
                context: s.context,
                created: s.created,
            });
        }
        let h = Header {
            version: FORMAT_VERSION,
            seq,
            uuid,
            cipher,
            sector_size,
            data_offset: self.data_offset,
            data_size: self.data_size,
            key_digest,
            mac,
            binding: self.binding.map(|b| Binding { volume_id: b.volume_id }),
            slots,
            checkpoint: self.reencrypt.map(|c| Checkpoint { kind: c.kind, offset: c.offset, extra: c.extra }),
            zero_sectors: self.zero_sectors,
        };
        h.validate()?;
        Ok(h)
    }
}

fn field(name: &str, reason: String) -> HeaderError {
    HeaderError::Field { field: name.to_owned(), reason }
}

/// Only the canonical lowercase hyphenated form is accepted, so one uuid has one spelling.
fn parse_uuid(s: &str) -> Result<Uuid, HeaderError> {
    let u = Uuid::try_parse(s).map_err(|e| field("uuid", format!("{s:?} is not a uuid: {e}")))?;
    let mut buf = Uuid::encode_buffer();
    if u.hyphenated().encode_lower(&mut buf) != s {
        return Err(field("uuid", format!("{s:?} is not in lowercase hyphenated form")));
    }
    Ok(u)
}

fn hex32(name: &str, s: &str) -> Result<[u8; 32], HeaderError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|e| field(name, format!("not 32 bytes of hex: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::tests::{key, sample};

    fn raw_json(h: &Header) -> serde_json::Value {
        serde_json::to_value(RawMetadata::from_header(h)).unwrap()
    }

    #[test]
    fn zero_sectors_is_written_only_when_set_and_round_trips() {
        let mut h = sample(&key(1));
        assert!(raw_json(&h).get("zero_sectors").is_none());
        h.zero_sectors = true;
        let v = raw_json(&h);
        assert_eq!(v["zero_sectors"], serde_json::Value::Bool(true));
        let raw: RawMetadata = serde_json::from_value(v).unwrap();
        assert!(raw.into_header(0).unwrap().zero_sectors);
    }

    fn parse(v: serde_json::Value) -> Result<Header, HeaderError> {
        let raw: RawMetadata = serde_json::from_value(v).map_err(|e| field("json", e.to_string()))?;
        raw.into_header(1)
    }

    #[test]
    fn round_trips_through_raw() {
        let mut h = sample(&key(1));
        h.seq = 1;
        assert_eq!(parse(raw_json(&h)).unwrap(), h);
    }

    #[test]
    fn unknown_cipher_is_refused_by_name() {
        let mut v = raw_json(&sample(&key(1)));
        v["cipher"] = "aes-cbc-essiv:sha256".into();
        assert!(matches!(parse(v), Err(HeaderError::UnsupportedCipher(c)) if c == "aes-cbc-essiv:sha256"));
    }

    #[test]
    fn wrong_key_bytes_is_refused() {
        let mut v = raw_json(&sample(&key(1)));
        v["key_bytes"] = 32.into();
        assert!(matches!(parse(v), Err(HeaderError::Field { field, .. }) if field == "key_bytes"));
    }

    #[test]
    fn odd_sector_size_is_refused() {
        let mut v = raw_json(&sample(&key(1)));
        v["sector_size"] = 1024.into();
        assert!(matches!(parse(v), Err(HeaderError::Field { field, .. }) if field == "sector_size"));
    }

    #[test]
    fn non_canonical_uuid_is_refused() {
        let mut v = raw_json(&sample(&key(1)));
        v["uuid"] = "11111111111111111111111111111111".into();
        assert!(matches!(parse(v), Err(HeaderError::Field { field, .. }) if field == "uuid"));
    }

    #[test]
    fn short_mac_is_refused() {
        let mut v = raw_json(&sample(&key(1)));
        v["mac"] = "abcd".into();
        assert!(matches!(parse(v), Err(HeaderError::Field { field, .. }) if field == "mac"));
    }

    #[test]
    fn unknown_digest_alg_is_refused() {
        let mut v = raw_json(&sample(&key(1)));
        v["key_digest"]["alg"] = "pbkdf2".into();
        assert!(matches!(parse(v), Err(HeaderError::Field { field, .. }) if field == "key_digest.alg"));
    }

    #[test]
    fn oversized_wrapped_is_refused_before_decoding() {
        let mut v = raw_json(&sample(&key(1)));
        v["slots"][0]["wrapped"] = "00".repeat(MAX_WRAPPED + 1).into();
        assert!(matches!(parse(v), Err(HeaderError::Field { field, .. }) if field == "slots[0].wrapped"));
    }

    #[test]
    fn missing_nullable_field_is_refused() {
        let mut v = raw_json(&sample(&key(1)));
        v.as_object_mut().unwrap().remove("binding");
        assert!(serde_json::from_value::<RawMetadata>(v).is_err());
    }

    #[test]
    fn null_binding_is_accepted() {
        let v = raw_json(&sample(&key(1)));
        assert!(v["binding"].is_null());
        assert!(parse(v).unwrap().binding.is_none());
    }

    #[test]
    fn unknown_nested_field_is_refused() {
        let mut v = raw_json(&sample(&key(1)));
        v["slots"][0]["extra"] = 1.into();
        assert!(serde_json::from_value::<RawMetadata>(v).is_err());
    }
}
