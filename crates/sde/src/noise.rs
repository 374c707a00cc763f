//! Seeded Gaussian noise, one generator per sample.
//!
//! Candle's CPU generator cannot be seeded, so every draw in scoreguide comes from here.
//! Each sample owns its own generator (as EDM's `StackedRandomGenerator`), so a sample's
//! noise does not depend on the batch it is drawn in.

use candle_core::{bail, DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// SplitMix64 finaliser: independent-looking seeds from (seed, stream).
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed
        ^ stream
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One seeded generator per sample of a batch.
pub struct SampleNoise {
    rngs: Vec<StdRng>,
}

impl SampleNoise {
    /// Generators for samples with the given seeds.
    pub fn from_seeds(seeds: impl IntoIterator<Item = u64>) -> Self {
        Self {
            rngs: seeds.into_iter().map(StdRng::seed_from_u64).collect(),
        }
    }

    /// Samples `first..first + n` of the stream named by `seed`: sample i always gets
    /// the same noise whatever the batch it is drawn in.
    pub fn new(seed: u64, first: usize, n: usize) -> Self {
        Self::from_seeds((first..first + n).map(|i| derive_seed(seed, i as u64)))
    }

    pub fn len(&self) -> usize {
        self.rngs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rngs.is_empty()
    }

    /// Standard normal noise of `shape` (its first dimension is the batch and must equal
    /// the number of generators), built on the CPU and moved to `device`.
    pub fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        if shape.first() != Some(&self.rngs.len()) {
            bail!(
                "seeded noise: shape {shape:?} does not start with the batch size {} of the generators",
                self.rngs.len()
            );
        }
        let per: usize = shape[1..].iter().product();
        let mut v = Vec::with_capacity(per * self.rngs.len());
        for rng in self.rngs.iter_mut() {
            v.extend((0..per).map(|_| {
                let z: f32 = StandardNormal.sample(rng);
                z
            }));
        }
        Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// Noise shaped like `x`.
    pub fn randn_like(&mut self, x: &Tensor) -> Result<Tensor> {
        self.randn(x.dims(), x.dtype(), x.device())
    }
}

/// Standard normal values of `shape` drawn from `rng` (f32), built on the CPU and moved
/// to `device`: the seeded replacement for `Tensor::randn`.
pub fn randn<R: rand::Rng + ?Sized>(
    rng: &mut R,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)
}
