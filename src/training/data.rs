//! Datasets named by URL: `file:///dir` or `s3://bucket/prefix`, laid out
//! as `effusion/` and `nofinding/` with an optional `labels.csv`.
//!
//! A request's dataset is checked when it is submitted (so a typo is an
//! error at the keyboard, not a failed run an hour later) and fetched by the
//! trainer that runs it, through the same object store code as the registry.

use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;

use super::TrainingError;
use crate::registry::open_url;

/// File extensions (compared case-insensitively) that the trainer reads as
/// images; anything else in the class folders is ignored, as it is there.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "dcm"];
/// The two class folders.
pub const CLASS_DIRS: [&str; 2] = ["effusion", "nofinding"];
/// Largest dataset a trainer fetches from an object store.
pub const MAX_DATASET_BYTES: u64 = 64 << 30;

/// What a dataset holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DataSummary {
    /// Images under `effusion/`.
    pub effusion: usize,
    /// Images under `nofinding/`.
    pub nofinding: usize,
    /// Whether `labels.csv` is there.
    pub labels_csv: bool,
    /// Bytes of the images and labels.
    pub bytes: u64,
}

fn is_image(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)))
}

/// The objects of a dataset that training reads, by path relative to its
/// root, with their sizes.
async fn list(url: &str) -> Result<(Vec<(String, u64)>, DataSummary), TrainingError> {
    let bad = |reason: String| TrainingError::Data {
        url: url.to_string(),
        reason,
    };
    if url.starts_with("file:") {
        // The store would create a missing directory; a typo must not.
        let dir = url::Url::parse(url)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| bad("not an absolute file:// path".into()))?;
        if !dir.is_dir() {
            return Err(bad("no such directory".into()));
        }
    }
    let (store, prefix, _) = open_url(url).map_err(|e| bad(e.to_string()))?;
    let mut files = Vec::new();
    let mut summary = DataSummary {
        effusion: 0,
        nofinding: 0,
        labels_csv: false,
        bytes: 0,
    };
    let root = |rel: &str| {
        if prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{prefix}/{rel}"))
        }
    };
    for class in CLASS_DIRS {
        let listed: Vec<_> = store
            .list(Some(&root(class)))
            .try_collect()
            .await
            .map_err(|e| bad(format!("listing {class}/: {e}")))?;
        for meta in listed {
            let full = meta.location.as_ref();
            let rel = full
                .strip_prefix(prefix.as_str())
                .unwrap_or(full)
                .trim_start_matches('/');
            // Only the class folder's own files: the trainer does not recurse.
            let Some(name) = rel.strip_prefix(class).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            if name.contains('/') || name.starts_with('.') || !is_image(name) {
                continue;
            }
            if class == "effusion" {
                summary.effusion += 1;
            } else {
                summary.nofinding += 1;
            }
            summary.bytes += meta.size;
            files.push((rel.to_string(), meta.size));
        }
    }
    match store.head(&root("labels.csv")).await {
        Ok(meta) => {
            summary.labels_csv = true;
            summary.bytes += meta.size;
            files.push(("labels.csv".into(), meta.size));
        }
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(bad(format!("labels.csv: {e}"))),
    }
    Ok((files, summary))
}

/// Checks that `url` is a dataset training can use: a supported URL that
/// can be read, with images of both classes.
pub async fn check(url: &str) -> Result<DataSummary, TrainingError> {
    let (_, summary) = list(url).await?;
    let mut missing = Vec::new();
    if summary.effusion == 0 {
        missing.push("effusion/");
    }
    if summary.nofinding == 0 {
        missing.push("nofinding/");
    }
    if !missing.is_empty() {
        return Err(TrainingError::Data {
            url: url.to_string(),
            reason: format!(
                "no images ({}) in {}; a dataset needs both classes",
                IMAGE_EXTENSIONS.join(", "),
                missing.join(" and ")
            ),
        });
    }
    if summary.bytes > MAX_DATASET_BYTES {
        return Err(TrainingError::Data {
            url: url.to_string(),
            reason: format!(
                "{} bytes is more than a trainer fetches ({MAX_DATASET_BYTES}); mount it and use file://",
                summary.bytes
            ),
        });
    }
    Ok(summary)
}

/// A local folder holding the dataset at `url`: the folder itself for
/// `file://`, else a copy under `work_dir/datasets/` (kept between runs and
/// refreshed file by file when sizes differ).
pub async fn materialise(url: &str, work_dir: &Path) -> Result<PathBuf, TrainingError> {
    let bad = |reason: String| TrainingError::Data {
        url: url.to_string(),
        reason,
    };
    if url.starts_with("file:") {
        check(url).await?;
        return url::Url::parse(url)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| bad("not an absolute file:// path".into()));
    }
    let (files, _) = list(url).await?;
    check(url).await?;
    let (store, prefix, _) = open_url(url).map_err(|e| bad(e.to_string()))?;
    let dir = work_dir
        .join("datasets")
        .join(&crate::model::manifest::sha256_hex(url.as_bytes())[..16]);
    for (rel, size) in files {
        let target = dir.join(&rel);
        if std::fs::metadata(&target).is_ok_and(|m| m.len() == size) {
            continue;
        }
        let key = if prefix.is_empty() {
            ObjectPath::from(rel.as_str())
        } else {
            ObjectPath::from(format!("{prefix}/{rel}"))
        };
        let bytes = store
            .get(&key)
            .await
            .map_err(|e| bad(format!("{rel}: {e}")))?
            .bytes()
            .await
            .map_err(|e| bad(format!("{rel}: {e}")))?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| bad(format!("{}: {e}", parent.display())))?;
        }
        // Written beside, then renamed: a trainer killed mid-download never
        // leaves a truncated image that a size check would take as whole.
        let tmp = target.with_extension("part");
        std::fs::write(&tmp, &bytes).map_err(|e| bad(format!("{}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &target).map_err(|e| bad(format!("{}: {e}", target.display())))?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_url(p: &Path) -> String {
        url::Url::from_directory_path(p).unwrap().to_string()
    }

    #[tokio::test]
    async fn a_dataset_needs_both_classes_and_an_existing_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("effusion")).unwrap();
        std::fs::create_dir_all(root.join("nofinding/deeper")).unwrap();
        std::fs::write(root.join("effusion/a.png"), b"x").unwrap();
        std::fs::write(root.join("nofinding/notes.txt"), b"x").unwrap();
        std::fs::write(root.join("nofinding/deeper/b.png"), b"x").unwrap();
        let e = check(&file_url(root)).await.unwrap_err().to_string();
        assert!(
            e.contains("nofinding/") && !e.contains("effusion/ and"),
            "{e}"
        );
        std::fs::write(root.join("nofinding/b.PNG"), b"xy").unwrap();
        std::fs::write(root.join("labels.csv"), b"image,patient_id\n").unwrap();
        let s = check(&file_url(root)).await.unwrap();
        assert_eq!((s.effusion, s.nofinding, s.labels_csv), (1, 1, true));
        let missing = file_url(&root.join("nope"));
        let e = check(&missing).await.unwrap_err().to_string();
        assert!(e.contains("no such directory"), "{e}");
        assert!(!root.join("nope").exists(), "checking must not create it");
        let e = check("http://example.com/x").await.unwrap_err().to_string();
        assert!(e.contains("not file or s3"), "{e}");
    }
}
