//! Reader for the IDX format of MNIST / Fashion-MNIST (raw or gzip-compressed).
//!
//! Layout: 2 zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions,
//! then one big-endian u32 per dimension, then the data in row-major order.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn err(origin: &str, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!("{origin}: {msg}"))
}

/// Decompresses if the bytes start with the gzip magic (1f 8b).
pub fn maybe_gunzip(bytes: &[u8], origin: &str) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| err(origin, format!("corrupt gzip stream ({e})")))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an IDX file's bytes (gzip or raw). `origin` names the file in errors.
pub fn parse(bytes: &[u8], origin: &str) -> Result<IdxArray> {
    let raw = maybe_gunzip(bytes, origin)?;
    if raw.len() < 4 {
        return Err(err(origin, "truncated: shorter than the 4-byte IDX header"));
    }
    if raw[0] != 0 || raw[1] != 0 {
        return Err(err(
            origin,
            format!(
                "not an IDX file: magic starts with {:#04x} {:#04x}, expected 0x00 0x00",
                raw[0], raw[1]
            ),
        ));
    }
    if raw[2] != 0x08 {
        return Err(err(
            origin,
            format!(
                "IDX element type {:#04x} is not supported (only 0x08, unsigned byte)",
                raw[2]
            ),
        ));
    }
    let nd = raw[3] as usize;
    let header = 4 + 4 * nd;
    if raw.len() < header {
        return Err(err(
            origin,
            format!(
                "truncated: header declares {nd} dimensions but the file ends at byte {}",
                raw.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            u32::from_be_bytes(raw[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    let have = raw.len() - header;
    if have < n {
        return Err(err(
            origin,
            format!("truncated: dims {dims:?} need {n} data bytes, the file has {have}"),
        ));
    }
    if have > n {
        return Err(err(
            origin,
            format!(
                "{} trailing bytes after the {n} data bytes of dims {dims:?}",
                have - n
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: raw[header..].to_vec(),
    })
}

/// Reads an IDX file from disk.
pub fn read(path: &Path) -> Result<IdxArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes, &path.display().to_string())
}

/// Encodes an IDX array (raw, uncompressed): used by tests and by tools writing IDX.
pub fn encode(arr: &IdxArray) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, arr.dims.len() as u8];
    for d in &arr.dims {
        out.extend((*d as u32).to_be_bytes());
    }
    out.extend(&arr.data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> IdxArray {
        IdxArray {
            dims: vec![2, 2, 3],
            data: (0..12).collect(),
        }
    }

    #[test]
    fn raw_and_gzip_round_trip() {
        let raw = encode(&sample());
        assert_eq!(parse(&raw, "x").unwrap(), sample());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        assert_eq!(parse(&gz.finish().unwrap(), "x").unwrap(), sample());
    }

    #[test]
    fn corrupt_inputs_name_the_file_and_the_problem() {
        let raw = encode(&sample());
        let e = parse(&raw[..raw.len() - 1], "imgs.idx")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("imgs.idx")
                && e.contains("truncated")
                && e.contains("need 12 data bytes, the file has 11"),
            "{e}"
        );
        let e = parse(&raw[..6], "imgs.idx").unwrap_err().to_string();
        assert!(e.contains("header declares 3 dimensions"), "{e}");
        let mut bad = raw.clone();
        bad[0] = 0x50;
        assert!(parse(&bad, "f")
            .unwrap_err()
            .to_string()
            .contains("not an IDX file"));
        let mut bad = raw.clone();
        bad[2] = 0x0d;
        assert!(parse(&bad, "f")
            .unwrap_err()
            .to_string()
            .contains("element type 0x0d"));
        let mut extra = raw.clone();
        extra.push(1);
        assert!(parse(&extra, "f")
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let e = parse(&[0x1f, 0x8b, 1, 2, 3], "f.gz")
            .unwrap_err()
            .to_string();
        assert!(e.contains("corrupt gzip"), "{e}");
    }
}
