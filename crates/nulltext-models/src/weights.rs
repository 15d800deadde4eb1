//! Safetensors files → tensors, by name, with the file and the name in every error.
//!
//! A [`WeightStore`] memory-maps one or more `*.safetensors` files and indexes their tensors
//! under *logical* names (diffusers names): a diffusers folder uses the names as they are, a
//! single-file checkpoint is renamed on open. Tensors are converted to the store's dtype
//! (f16/bf16 files load as f32 unless asked otherwise) when they are read.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

struct Entry {
    file: usize,
    key: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    range: (usize, usize),
}

/// `(name, shape)` requests of a recording store.
type Requests = Mutex<Vec<(String, Vec<usize>)>>;

/// Tensors of one model component, memory-mapped.
pub struct WeightStore {
    files: Vec<MappedFile>,
    index: HashMap<String, Entry>,
    device: Device,
    dtype: DType,
    used: Mutex<BTreeSet<String>>,
    /// In recording mode every lookup succeeds with a placeholder and is written down.
    recorded: Option<Requests>,
    /// Tensors computed at load time (e.g. split from a fused file tensor), by name.
    overlay: HashMap<String, Tensor>,
}

fn dtype_name(d: safetensors::Dtype) -> String {
    format!("{d:?}")
}

fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        _ => return None,
    })
}

/// Reads the header of a safetensors file without loading its data.
pub fn read_header(path: &Path) -> Result<(Mmap, usize, safetensors::tensor::Metadata)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is only read; a file modified while mapped is a user error that
    // can at worst give wrong numbers, which the shape/dtype checks below bound.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (n, meta) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    Ok((mmap, 8 + n, meta))
}

impl WeightStore {
    /// Opens `paths`, keeping every tensor under its own name.
    pub fn open(paths: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        Self::open_renamed(paths, device, dtype, |k| Some(k.to_string()))
    }

    /// Opens `paths`, indexing each tensor under `rename(key)`; `None` skips the tensor.
    pub fn open_renamed(
        paths: &[PathBuf],
        device: &Device,
        dtype: DType,
        rename: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let (mmap, data_start, meta) = read_header(path)?;
            let file_idx = files.len();
            let data_len = mmap.len() - data_start;
            for (key, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                if b > data_len || a > b {
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        msg: format!("tensor `{key}` points past the end of the file (truncated?)"),
                    });
                }
                if let Some(name) = rename(&key) {
                    index.insert(
                        name,
                        Entry {
                            file: file_idx,
                            key: key.clone(),
                            dtype: info.dtype,
                            shape: info.shape.clone(),
                            range: (a, b),
                        },
                    );
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start,
            });
        }
        Ok(Self {
            files,
            index,
            device: device.clone(),
            dtype,
            used: Mutex::new(BTreeSet::new()),
            recorded: None,
            overlay: HashMap::new(),
        })
    }

    /// A store that holds nothing and answers every request with a placeholder tensor,
    /// recording the names and shapes asked for: loading a model against it lists exactly
    /// the tensors that model needs (see [`crate::tensors`]).
    pub fn recording() -> Self {
        Self {
            files: Vec::new(),
            index: HashMap::new(),
            device: Device::Cpu,
            dtype: DType::F32,
            used: Mutex::new(BTreeSet::new()),
            recorded: Some(Mutex::new(Vec::new())),
            overlay: HashMap::new(),
        }
    }

    /// The `(name, shape)` requests of a recording store, in request order.
    pub fn recorded(&self) -> Vec<(String, Vec<usize>)> {
        self.recorded
            .as_ref()
            .map(|r| r.lock().unwrap().clone())
            .unwrap_or_default()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        self.recorded.is_some() || self.overlay.contains_key(name) || self.index.contains_key(name)
    }

    /// Adds a tensor computed at load time under `name` (it wins over the files).
    pub fn insert(&mut self, name: String, t: Tensor) {
        self.overlay.insert(name, t);
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    /// Shape of a tensor as stored, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        match self.overlay.get(name) {
            Some(t) => Some(t.dims()),
            None => self.index.get(name).map(|e| e.shape.as_slice()),
        }
    }

    fn location(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            many => many
                .iter()
                .map(|f| f.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    fn entry_location(&self, e: &Entry, name: &str) -> String {
        let path = self.files[e.file].path.display();
        if e.key == name {
            path.to_string()
        } else {
            format!("{path} (as `{}`)", e.key)
        }
    }

    /// Reads `name` with its stored shape, in the store's dtype, on the store's device.
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        self.read(name, None, self.dtype)
    }

    /// Reads `name`, checking its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(rec) = &self.recorded {
            rec.lock().unwrap().push((name.to_string(), shape.to_vec()));
            return Ok(Tensor::zeros(1, self.dtype, &self.device)?.broadcast_as(shape)?);
        }
        self.read(name, Some(shape), self.dtype)
    }

    /// Reads `name` on the CPU in `dtype`, whatever the store's device and dtype.
    pub fn get_cpu(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let t = self.read_raw(name, None)?;
        Ok(t.to_dtype(dtype)?)
    }

    fn read_raw(&self, name: &str, shape: Option<&[usize]>) -> Result<Tensor> {
        if let Some(t) = self.overlay.get(name) {
            if let Some(shape) = shape {
                if t.dims() != shape {
                    return Err(Error::TensorShape {
                        name: name.to_string(),
                        location: self.location(),
                        expected: shape.to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
            }
            self.used.lock().unwrap().insert(name.to_string());
            return Ok(t.to_device(&Device::Cpu)?);
        }
        let e = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: self.location(),
        })?;
        if let Some(shape) = shape {
            if e.shape != shape {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    location: self.entry_location(e, name),
                    expected: shape.to_vec(),
                    got: e.shape.clone(),
                });
            }
        }
        let dtype = candle_dtype(e.dtype).ok_or_else(|| Error::TensorDtype {
            name: name.to_string(),
            location: self.entry_location(e, name),
            dtype: dtype_name(e.dtype),
        })?;
        let f = &self.files[e.file];
        let bytes = &f.mmap[f.data_start + e.range.0..f.data_start + e.range.1];
        let n: usize = e.shape.iter().product();
        if bytes.len() != n * dtype.size_in_bytes() {
            return Err(Error::Safetensors {
                path: f.path.clone(),
                msg: format!(
                    "tensor `{}` has {} bytes for shape {:?}",
                    e.key,
                    bytes.len(),
                    e.shape
                ),
            });
        }
        self.used.lock().unwrap().insert(name.to_string());
        let t = Tensor::from_raw_buffer(bytes, dtype, &e.shape, &Device::Cpu)?;
        // The bytes are copied: unmap their pages, so that loading a model holds each weight
        // once rather than also as mapped file pages until the whole file is closed (10 GiB
        // more resident at the peak of an fp32 SDXL UNet's load). The page cache keeps them;
        // a later read of the same range maps them again.
        #[cfg(unix)]
        // SAFETY: a read-only file mapping; dropping its pages only makes the next access
        // fault them in again from the file, with the same contents.
        let _ = unsafe {
            f.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                f.data_start + e.range.0,
                bytes.len(),
            )
        };
        Ok(t)
    }

    fn read(&self, name: &str, shape: Option<&[usize]>, dtype: DType) -> Result<Tensor> {
        let t = self.read_raw(name, shape)?;
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        Ok(t.to_device(&self.device)?)
    }

    /// Names present in the files that no layer asked for (a fine-tune's extra keys).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut v: Vec<String> = self
            .index
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn root(&self) -> Vb<'_> {
        Vb {
            store: self,
            prefix: String::new(),
        }
    }
}

/// A view of a [`WeightStore`] under a name prefix, like candle's `VarBuilder::pp`.
#[derive(Clone)]
pub struct Vb<'a> {
    store: &'a WeightStore,
    prefix: String,
}

impl<'a> Vb<'a> {
    pub fn pp(&self, s: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() {
            s.to_string()
        } else {
            format!("{}.{s}", self.prefix)
        };
        Vb {
            store: self.store,
            prefix,
        }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.store.get(&self.path(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.path(name))
    }

    pub fn shape_of(&self, name: &str) -> Option<&'a [usize]> {
        self.store.shape_of(&self.path(name))
    }

    pub fn device(&self) -> &'a Device {
        self.store.device()
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype()
    }

    pub fn store(&self) -> &'a WeightStore {
        self.store
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Resident size in KiB of this process's mapping of `path` (`/proc/self/smaps`).
    fn mapped_rss_kib(path: &Path) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let name = path.to_str()?;
        let mut lines = smaps.lines();
        lines.find(|l| l.ends_with(name))?;
        lines
            .find_map(|l| l.strip_prefix("Rss:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// A weight read is copied out of the mapped file, and its pages leave the process.
    #[test]
    fn reading_a_weight_unmaps_its_file_pages() {
        let dir = std::env::temp_dir().join(format!("nulltext-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let n = 4 << 20; // 16 MiB of f32
        let w = Tensor::arange(0u32, n as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), w.clone())]), &path)
            .unwrap();
        let store =
            WeightStore::open(std::slice::from_ref(&path), &Device::Cpu, DType::F32).unwrap();
        let got = store.get("w", &[n]).unwrap();
        let rss = mapped_rss_kib(&path).expect("the file is mapped");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), w.to_vec1::<f32>().unwrap());
        assert!(rss <= 64, "{rss} KiB of the 16 MiB file still resident");
    }
}
