//! Labelled image sets: MNIST-format IDX files (Fashion-MNIST, MNIST; gzipped or not)
//! and CIFAR-10/100 binary batches, as `[N, C·H·W]` rows scaled to [−1, 1] with labels,
//! and seeded batches with horizontal flips.
//!
//! The readers are our own: candle-datasets reads the same two formats (uncompressed
//! IDX, CIFAR-10 only) but brings 450 crates with it (an async HTTP stack, parquet) for
//! its hub loaders, and a malformed file here must give an error that names the file
//! and what is wrong with it.

use crate::dataset::Dataset;
use candle_core::{bail, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const FASHION_MNIST_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Which part of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSplit {
    Train,
    Test,
}

/// Labelled images: rows `[N, channels·size·size]` in [−1, 1] (channel-major, rows of
/// pixels), one label `< classes` per image.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub images: Dataset,
    pub labels: Vec<u32>,
    pub channels: usize,
    pub size: usize,
    pub classes: usize,
}

impl ImageSet {
    /// Checks the sizes agree and every label is below `classes`.
    pub fn new(
        images: Tensor,
        labels: Vec<u32>,
        channels: usize,
        size: usize,
        classes: usize,
        name: &str,
    ) -> Result<Self> {
        let images = Dataset::new(images, name)?;
        if images.dim() != channels * size * size {
            bail!(
                "images `{name}`: rows of {} values, expected {channels} × {size} × {size}",
                images.dim()
            );
        }
        if labels.len() != images.len() {
            bail!(
                "images `{name}`: {} labels for {} images",
                labels.len(),
                images.len()
            );
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
            bail!("images `{name}`: label {bad} is not below the {classes} classes");
        }
        Ok(Self {
            images,
            labels,
            channels,
            size,
            classes,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` images (all if fewer).
    pub fn take(&self, n: usize) -> Result<Self> {
        let n = n.min(self.len());
        let idx: Vec<u32> = (0..n as u32).collect();
        Self::new(
            self.images.rows(&idx)?,
            self.labels[..n].to_vec(),
            self.channels,
            self.size,
            self.classes,
            self.images.name(),
        )
    }

    /// The images of `indices` and their labels (`[n]`, u32), each flipped left–right
    /// with probability ½ when `flip` (drawn from `rng`).
    pub fn batch(&self, indices: &[u32], flip: bool, rng: &mut StdRng) -> Result<(Tensor, Tensor)> {
        let x = self.images.rows(indices)?;
        let labels = indices
            .iter()
            .map(|&i| self.labels[i as usize])
            .collect::<Vec<_>>();
        let labels = Tensor::from_vec(labels, indices.len(), x.device())?;
        if !flip {
            return Ok((x, labels));
        }
        let flips: Vec<bool> = indices.iter().map(|_| rng.random_bool(0.5)).collect();
        Ok((flip_rows(&x, &flips, self.channels, self.size)?, labels))
    }

    /// The images of class `class`.
    pub fn of_class(&self, class: u32) -> Result<Tensor> {
        let idx: Vec<u32> = (0..self.len() as u32)
            .filter(|&i| self.labels[i as usize] == class)
            .collect();
        self.images.rows(&idx)
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            images: self.images.to_device(device)?,
            ..self.clone()
        })
    }
}

/// Mirrors the rows whose flag is set (left–right, every channel).
fn flip_rows(x: &Tensor, flips: &[bool], channels: usize, size: usize) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let mut v = x
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (row, &f) in v.chunks_exact_mut(d).zip(flips) {
        if f {
            for line in row.chunks_exact_mut(size) {
                line.reverse();
            }
        }
    }
    debug_assert_eq!(d, channels * size * size);
    Tensor::from_vec(v, (n, d), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())
}

/// The contents of `path`, gunzipped when it ends in `.gz`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    let read = match path.extension().is_some_and(|e| e == "gz") {
        true => flate2::read::GzDecoder::new(file).read_to_end(&mut bytes),
        false => std::io::BufReader::new(file).read_to_end(&mut bytes),
    };
    read.map_err(|e| candle_core::Error::msg(format!("{}: cannot read: {e}", path.display())))?;
    Ok(bytes)
}

fn be_u32(bytes: &[u8], at: usize) -> usize {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
}

/// An IDX file of unsigned bytes (MNIST's format): its dimensions and values. Refuses
/// another element type, a wrong rank, or a size that disagrees with the header.
pub fn read_idx(path: &Path, rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    parse_idx(&read_maybe_gz(path)?, rank, &path.display().to_string())
}

/// [`read_idx`] on the bytes of a file (`what` names it in errors).
pub fn parse_idx(bytes: &[u8], rank: usize, what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        bail!("{what}: not an IDX file (bad magic number)");
    }
    if bytes[2] != 0x08 {
        bail!(
            "{what}: IDX element type {:#04x}, expected unsigned bytes (0x08)",
            bytes[2]
        );
    }
    if bytes[3] as usize != rank {
        bail!("{what}: an IDX array of rank {}, expected {rank}", bytes[3]);
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        bail!("{what}: truncated IDX header");
    }
    let dims: Vec<usize> = (0..rank).map(|i| be_u32(bytes, 4 + 4 * i)).collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match count {
        None => bail!("{what}: the header's dimensions {dims:?} overflow"),
        Some(n) if n != bytes.len() - header => bail!(
            "{what}: the header says {dims:?} ({n} values) but the file holds {}",
            bytes.len() - header
        ),
        Some(_) => {}
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// The first of `names` (each tried as is and gzipped) in `dir`.
fn find(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names
        .iter()
        .flat_map(|n| [dir.join(n), dir.join(format!("{n}.gz"))])
        .find(|p| p.is_file())
}

/// An MNIST-format set (MNIST, Fashion-MNIST) from `dir`: `train-images-idx3-ubyte` and
/// `train-labels-idx1-ubyte` (or `t10k-…` for the test split), gzipped or not. The
/// error for missing files says where they were looked for and how to install them.
pub fn mnist_format(dir: &Path, split: ImageSplit, name: &str) -> Result<ImageSet> {
    let prefix = match split {
        ImageSplit::Train => "train",
        ImageSplit::Test => "t10k",
    };
    let images_name = format!("{prefix}-images-idx3-ubyte");
    let labels_name = format!("{prefix}-labels-idx1-ubyte");
    let (Some(images_path), Some(labels_path)) =
        (find(dir, &[&images_name]), find(dir, &[&labels_name]))
    else {
        bail!(
            "{name}: no {images_name}[.gz] and {labels_name}[.gz] in {}. Fashion-MNIST installs with `apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_SYSTEM_DIR}); for MNIST, put the four IDX files of yann.lecun.com/exdb/mnist in a folder and pass it",
            dir.display()
        );
    };
    let (dims, pixels) = read_idx(&images_path, 3)?;
    let (ldims, labels) = read_idx(&labels_path, 1)?;
    if dims[1] != dims[2] {
        bail!(
            "{}: images are {}×{}, expected square",
            images_path.display(),
            dims[1],
            dims[2]
        );
    }
    if ldims[0] != dims[0] {
        bail!(
            "{}: {} labels for the {} images of {}",
            labels_path.display(),
            ldims[0],
            dims[0],
            images_path.display()
        );
    }
    let x: Vec<f32> = pixels.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    let images = Tensor::from_vec(x, (dims[0], dims[1] * dims[2]), &Device::Cpu)?;
    let labels = labels.into_iter().map(u32::from).collect();
    ImageSet::new(images, labels, 1, dims[1], 10, name)
}

/// Fashion-MNIST from `dir`, else `$SCOREGUIDE_FASHION_MNIST`, else Debian's
/// [`FASHION_MNIST_SYSTEM_DIR`].
pub fn fashion_mnist(dir: Option<&Path>, split: ImageSplit) -> Result<ImageSet> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::var_os("SCOREGUIDE_FASHION_MNIST")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(FASHION_MNIST_SYSTEM_DIR)),
    };
    mnist_format(&dir, split, "Fashion-MNIST")
}

/// One CIFAR binary batch's bytes (`what` names it in errors): records of
/// `label_bytes` label bytes (the last is the label) and 3072 pixel bytes, as pixels in
/// [−1, 1] and labels.
pub fn parse_cifar(bytes: &[u8], label_bytes: usize, what: &str) -> Result<(Vec<f32>, Vec<u32>)> {
    let record = label_bytes + 3072;
    if label_bytes == 0 || bytes.is_empty() || bytes.len() % record != 0 {
        bail!(
            "{what}: {} bytes is not a whole number of {record}-byte records",
            bytes.len()
        );
    }
    let mut x = Vec::with_capacity(bytes.len() / record * 3072);
    let mut labels = Vec::with_capacity(bytes.len() / record);
    for r in bytes.chunks_exact(record) {
        labels.push(r[label_bytes - 1] as u32);
        x.extend(r[label_bytes..].iter().map(|&p| p as f32 / 127.5 - 1.0));
    }
    Ok((x, labels))
}

/// CIFAR-10 (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`: records of one
/// label byte and 3072 pixel bytes) or CIFAR-100 (`train.bin`, `test.bin`: a coarse and
/// a fine label byte, then the pixels; the fine label, 100 classes) from `dir`.
pub fn cifar(dir: &Path, hundred: bool, split: ImageSplit) -> Result<ImageSet> {
    let (files, label_bytes, classes, name): (Vec<String>, usize, usize, &str) =
        match (hundred, split) {
            (false, ImageSplit::Train) => (
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
                1,
                10,
                "CIFAR-10",
            ),
            (false, ImageSplit::Test) => (vec!["test_batch.bin".into()], 1, 10, "CIFAR-10"),
            (true, ImageSplit::Train) => (vec!["train.bin".into()], 2, 100, "CIFAR-100"),
            (true, ImageSplit::Test) => (vec!["test.bin".into()], 2, 100, "CIFAR-100"),
        };
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    for f in &files {
        let path = dir.join(f);
        if !path.is_file() {
            bail!(
                "{name}: no {} in {} (the binary version's batches, from www.cs.toronto.edu/~kriz/cifar.html, unpacked into one folder)",
                f,
                dir.display()
            );
        }
        let (pixels, l) = parse_cifar(
            &read_maybe_gz(&path)?,
            label_bytes,
            &path.display().to_string(),
        )?;
        x.extend(pixels);
        labels.extend(l);
    }
    let n = labels.len();
    ImageSet::new(
        Tensor::from_vec(x, (n, 3072), &Device::Cpu)?,
        labels,
        3,
        32,
        classes,
        name,
    )
}

/// Seeded generator for a batch's flips: step `step` of a run seeded `seed`.
pub fn flip_rng(seed: u64, step: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xF11F)
}
