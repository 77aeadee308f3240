//! Custom data sources: `hf://<repo>`, a folder of PNGs, a parquet file, an IDX folder.

use std::path::Path;

use super::{mnist, Dataset};
use crate::{Error, Result};

/// Loads (train, test) from a source string.
pub fn load(name: &str, source: &str) -> Result<(Dataset, Dataset)> {
    let path = Path::new(source);
    if path.is_dir() {
        return mnist::from_dir(name, path, mnist::Part::Train)
            .and_then(|tr| Ok((tr, mnist::from_dir(name, path, mnist::Part::Test)?)));
    }
    Err(Error::Data(format!(
        "{name}: source '{source}' is not a folder of IDX files (hub, PNG and parquet sources are not implemented yet)"
    )))
}
