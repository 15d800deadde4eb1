//! The data directory: finished inversions and edits as plain files, each result published
//! whole by renaming a staging folder into place, so that a crash leaves either nothing or
//! a complete result.
//!
//! ```text
//! DATA/jobs/<job>.json                                   job records (see `jobs`)
//! DATA/inversions/<inv>/inversion.json                   the record, written last
//!                       inversion.nti.safetensors        the standard inversion file
//!                       input.png, reconstruction.png
//! DATA/inversions/<inv>/edits/<edit>/edit.json, reconstruction.png, target-1.png, …,
//!                                    attention-0.png, …
//! DATA/tmp/                                              staging, emptied at start
//! ```
//!
//! Every path is built from server-generated [`Id`]s and fixed names.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::ids::Id;
use crate::params::EditRequest;

pub const INVERSION_RECORD: &str = "inversion.json";
pub const INVERSION_FILE: &str = "inversion.nti.safetensors";
pub const INPUT_PNG: &str = "input.png";
pub const RECONSTRUCTION_PNG: &str = "reconstruction.png";
pub const EDIT_RECORD: &str = "edit.json";

/// A finished inversion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InversionRecord {
    pub id: Id,
    pub job_id: Id,
    pub prompt: String,
    pub method: String,
    pub steps: usize,
    pub inner_steps: usize,
    pub guidance: f64,
    pub early_stop: f64,
    pub width: u32,
    pub height: u32,
    /// Adam iterations over all steps (0 for methods without optimization).
    pub iterations: usize,
    /// PSNR of the reconstruction against the input in dB (`None`: identical).
    pub psnr: Option<f64>,
    pub seconds: f64,
    pub model: String,
    pub model_fingerprint: String,
    pub created_ms: u64,
}

/// One picture of an edit: the prompt it shows and its file name in the edit's folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredImage {
    pub prompt: String,
    pub file: String,
}

/// A finished edit of an inversion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EditRecord {
    pub id: Id,
    pub inversion_id: Id,
    pub job_id: Id,
    /// The source prompt (the inversion's).
    pub prompt: String,
    pub targets: Vec<String>,
    /// The mode that ran: replace, refine or sdedit.
    pub mode: String,
    pub settings: EditRequest,
    /// The reconstruction first, then one image per target.
    pub images: Vec<StoredImage>,
    /// Cross-attention maps per prompt (source first), when asked for.
    pub attention_maps: Vec<StoredImage>,
    pub seconds: f64,
    pub created_ms: u64,
}

impl EditRecord {
    /// Whether `name` is one of the files this edit wrote.
    pub fn has_file(&self, name: &str) -> bool {
        self.images
            .iter()
            .chain(&self.attention_maps)
            .any(|i| i.file == name)
    }
}

struct Entry {
    record: InversionRecord,
    edits: BTreeMap<Id, EditRecord>,
}

pub struct Store {
    root: PathBuf,
    index: RwLock<BTreeMap<Id, Entry>>,
    /// An exclusive lock on `DATA/lock`, held while the store is open: one server per
    /// data folder.
    _lock: fs::File,
}

/// A folder under `DATA/tmp` that becomes a result when published; removed if dropped
/// unpublished.
pub struct Staging {
    dir: PathBuf,
    published: bool,
}

impl Staging {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Writes `value` as JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    nulltext::atomic::write_bytes_atomic(path, &bytes)?;
    Ok(())
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The entries of `dir` whose names are ids.
fn id_entries(dir: &Path) -> Vec<(Id, PathBuf)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id = Id::parse(name.to_str()?)?;
            Some((id, e.path()))
        })
        .collect()
}

impl Store {
    /// Opens (creating) a data directory: empties the staging area and indexes every
    /// complete result; folders without a readable record are left alone and skipped.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["jobs", "inversions", "tmp"] {
            fs::create_dir_all(root.join(d))
                .with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        let lock_path = root.join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "{} is in use by another nulltext serve (one server per data folder)",
                root.display()
            );
        }
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp)?.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        let mut index = BTreeMap::new();
        for (id, dir) in id_entries(&root.join("inversions")) {
            let record: InversionRecord = match read_json(&dir.join(INVERSION_RECORD)) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("skipping {}: {e:#}", dir.display());
                    continue;
                }
            };
            if record.id != id {
                tracing::warn!("skipping {}: its record names {}", dir.display(), record.id);
                continue;
            }
            let mut edits = BTreeMap::new();
            for (eid, edir) in id_entries(&dir.join("edits")) {
                match read_json::<EditRecord>(&edir.join(EDIT_RECORD)) {
                    Ok(r) if r.id == eid && r.inversion_id == id => {
                        edits.insert(eid, r);
                    }
                    Ok(_) => tracing::warn!("skipping {}: mismatched record", edir.display()),
                    Err(e) => tracing::warn!("skipping {}: {e:#}", edir.display()),
                }
            }
            index.insert(id, Entry { record, edits });
        }
        Ok(Self {
            _lock: lock,
            root: root.to_path_buf(),
            index: RwLock::new(index),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn jobs_dir(&self) -> PathBuf {
        self.root.join("jobs")
    }

    fn inversion_dir(&self, id: Id) -> PathBuf {
        self.root.join("inversions").join(id.to_string())
    }

    fn edit_dir(&self, inv: Id, edit: Id) -> PathBuf {
        self.inversion_dir(inv).join("edits").join(edit.to_string())
    }

    /// A fresh staging folder.
    pub fn stage(&self) -> Result<Staging> {
        let dir = self.root.join("tmp").join(Id::random().to_string());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Staging {
            dir,
            published: false,
        })
    }

    fn publish(&self, mut staging: Staging, dest: &Path) -> Result<()> {
        sync_dir(&staging.dir);
        let parent = dest.parent().expect("results live in a folder");
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        fs::rename(&staging.dir, dest).with_context(|| format!("publishing {}", dest.display()))?;
        staging.published = true;
        sync_dir(parent);
        Ok(())
    }

    /// Writes the record into `staging` and moves it into place as inversion `record.id`.
    pub fn publish_inversion(&self, staging: Staging, record: InversionRecord) -> Result<()> {
        write_json(&staging.path(INVERSION_RECORD), &record)?;
        let mut index = self.index.write().unwrap();
        self.publish(staging, &self.inversion_dir(record.id))?;
        index.insert(
            record.id,
            Entry {
                record,
                edits: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Writes the record into `staging` and moves it into place under its inversion, which
    /// must still exist.
    pub fn publish_edit(&self, staging: Staging, record: EditRecord) -> Result<()> {
        write_json(&staging.path(EDIT_RECORD), &record)?;
        let mut index = self.index.write().unwrap();
        let Some(entry) = index.get_mut(&record.inversion_id) else {
            anyhow::bail!("inversion {} was deleted", record.inversion_id);
        };
        self.publish(staging, &self.edit_dir(record.inversion_id, record.id))?;
        entry.edits.insert(record.id, record);
        Ok(())
    }

    pub fn inversion(&self, id: Id) -> Option<InversionRecord> {
        self.index
            .read()
            .unwrap()
            .get(&id)
            .map(|e| e.record.clone())
    }

    /// Every inversion with its number of edits, newest first.
    pub fn inversions(&self) -> Vec<(InversionRecord, usize)> {
        let mut v: Vec<_> = self
            .index
            .read()
            .unwrap()
            .values()
            .map(|e| (e.record.clone(), e.edits.len()))
            .collect();
        v.sort_by_key(|(r, _)| std::cmp::Reverse(r.created_ms));
        v
    }

    pub fn edit_count(&self, id: Id) -> usize {
        self.index
            .read()
            .unwrap()
            .get(&id)
            .map_or(0, |e| e.edits.len())
    }

    /// The edits of an inversion, oldest first (`None`: no such inversion).
    pub fn edits(&self, inv: Id) -> Option<Vec<EditRecord>> {
        let index = self.index.read().unwrap();
        let mut v: Vec<_> = index.get(&inv)?.edits.values().cloned().collect();
        v.sort_by_key(|e| e.created_ms);
        Some(v)
    }

    pub fn edit(&self, inv: Id, edit: Id) -> Option<EditRecord> {
        self.index
            .read()
            .unwrap()
            .get(&inv)?
            .edits
            .get(&edit)
            .cloned()
    }

    /// A file of an existing inversion (`name` is one of this module's constants).
    pub fn inversion_file(&self, id: Id, name: &'static str) -> Option<PathBuf> {
        self.index
            .read()
            .unwrap()
            .contains_key(&id)
            .then(|| self.inversion_dir(id).join(name))
    }

    /// A picture of an existing edit, if `name` is one that the edit wrote.
    pub fn edit_file(&self, inv: Id, edit: Id, name: &str) -> Option<PathBuf> {
        let index = self.index.read().unwrap();
        let record = index.get(&inv)?.edits.get(&edit)?;
        record
            .has_file(name)
            .then(|| self.edit_dir(inv, edit).join(name))
    }

    /// Removes an inversion and its edits (`false`: there was none).
    pub fn delete_inversion(&self, id: Id) -> Result<bool> {
        let mut index = self.index.write().unwrap();
        if !index.contains_key(&id) {
            return Ok(false);
        }
        // Renamed out of the way first, so that a crash mid-removal leaves no partial result.
        let trash = self.root.join("tmp").join(Id::random().to_string());
        fs::rename(self.inversion_dir(id), &trash)
            .with_context(|| format!("removing inversion {id}"))?;
        index.remove(&id);
        drop(index);
        let _ = fs::remove_dir_all(trash);
        Ok(true)
    }
}
