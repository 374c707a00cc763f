use candle_core::{bail, DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use scoreguide_sde::derive_seed;

/// A validated `[N, D]` dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    x: Tensor,
    name: String,
}

impl Dataset {
    /// Checks that `x` is `[N, D]` with N, D > 0 and every value finite; `name` is used
    /// in every error about this data.
    pub fn new(x: Tensor, name: &str) -> Result<Self> {
        let (n, d) = match x.dims() {
            [n, d] => (*n, *d),
            dims => bail!("dataset `{name}`: expected a [N, D] array, got shape {dims:?}"),
        };
        if n == 0 {
            bail!("dataset `{name}` is empty (0 rows)");
        }
        if d == 0 {
            bail!("dataset `{name}` has rows of dimension 0");
        }
        let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = v.iter().position(|v| !v.is_finite()) {
            bail!(
                "dataset `{name}`: row {} column {} is {} (NaN or infinite)",
                i / d,
                i % d,
                v[i]
            );
        }
        Ok(Self {
            x,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn len(&self) -> usize {
        self.x.dim(0).expect("validated [N, D]")
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn dim(&self) -> usize {
        self.x.dim(1).expect("validated [N, D]")
    }
    pub fn tensor(&self) -> &Tensor {
        &self.x
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            x: self.x.to_device(device)?,
            name: self.name.clone(),
        })
    }

    /// The rows at `indices`.
    pub fn rows(&self, indices: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(indices, indices.len(), self.x.device())?;
        self.x.index_select(&idx, 0)
    }

    /// Row indices of training step `step` when every epoch is cut into batches of
    /// `batch_size` (see [`Dataset::epoch_batches`]); a batch at least as large as the
    /// data is the whole data, in order (full-batch training).
    pub fn step_batch(&self, batch_size: usize, seed: u64, step: u64) -> Result<Vec<u32>> {
        if batch_size == 0 {
            bail!("dataset `{}`: batch size must be positive", self.name);
        }
        if batch_size >= self.len() {
            return Ok((0..self.len() as u32).collect());
        }
        let per_epoch = self.len().div_ceil(batch_size) as u64;
        let mut batches = self.epoch_batches(batch_size, seed, step / per_epoch)?;
        Ok(batches.swap_remove((step % per_epoch) as usize))
    }

    /// Row indices of epoch `epoch` cut into batches of `batch_size` (the last one may
    /// be smaller), shuffled by a generator seeded from (seed, epoch): any epoch can be
    /// replayed without the ones before it, which makes resumed training exact.
    pub fn epoch_batches(&self, batch_size: usize, seed: u64, epoch: u64) -> Result<Vec<Vec<u32>>> {
        if batch_size == 0 {
            bail!("dataset `{}`: batch size must be positive", self.name);
        }
        let mut idx: Vec<u32> = (0..self.len() as u32).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(derive_seed(seed, epoch)));
        Ok(idx.chunks(batch_size).map(|c| c.to_vec()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_batch_is_an_error_not_a_division_by_zero() {
        let x = Tensor::zeros((5, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let d = Dataset::new(x, "five").unwrap();
        let e = d.step_batch(0, 0, 3).unwrap_err().to_string();
        assert!(e.contains("five") && e.contains("batch size"), "{e}");
        assert_eq!(d.step_batch(2, 0, 3).unwrap().len(), 2);
    }
}
