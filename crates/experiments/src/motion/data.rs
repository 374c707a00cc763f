//! The motions as models see them, and Gen-neG's view of them.

use super::MotionRunConfig;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_data::motion::{MotionSet, Normalizer};
use scoreguide_genneg::Task;
use scoreguide_guidance::Cond;
use scoreguide_oracles::motion::{GroundOracle, MotionVerdict, FEATURES};

/// Motions, their standardisation, and the device their rows go to. A row's condition is
/// its action label and its frame mask.
pub struct MotionData {
    pub set: MotionSet,
    pub norm: Normalizer,
    pub device: Device,
}

impl MotionData {
    /// The training and test motions of `cfg` (procedural from `seed`, the test set from
    /// a seed of its own; or HumanML3D's splits) with the training set's statistics (or
    /// HumanML3D's `Mean.npy`/`Std.npy`).
    pub fn load(cfg: &MotionRunConfig, seed: u64, device: &Device) -> Result<(Self, Self)> {
        let mc = cfg.motion_config();
        let (train, test, norm) = match &cfg.data.humanml3d {
            Some(dir) => {
                let train = MotionSet::humanml3d(dir, "train", &mc)?;
                let test = MotionSet::humanml3d(dir, "test", &mc)?;
                (train, test, Normalizer::humanml3d(dir)?)
            }
            None => {
                let train = MotionSet::generate(&mc, cfg.data.train, seed)?;
                let test = MotionSet::generate(
                    &mc,
                    cfg.data.test,
                    scoreguide_sde::derive_seed(seed, 0x7e57),
                )?;
                let norm = Normalizer::fit(&train, 1e-3)?;
                (train, test, norm)
            }
        };
        let wrap = |set| Self {
            set,
            norm: norm.clone(),
            device: device.clone(),
        };
        Ok((wrap(train), wrap(test)))
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Standardised motions `idx`, `[n, frames × FEATURES]`.
    pub fn rows(&self, idx: &[u32]) -> Result<Tensor> {
        self.norm.rows(&self.set, idx, &self.device)
    }

    /// The condition of rows drawn under motions `idx`: their labels and frame masks.
    pub fn cond_of(&self, idx: &[u32]) -> Result<Cond> {
        let labels: Vec<u32> = idx
            .iter()
            .map(|&i| {
                self.set.actions.get(i as usize).copied().ok_or_else(|| {
                    candle_core::Error::msg(format!(
                        "motion {i} asked of a set of {} motions",
                        self.len()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        Ok(
            Cond::labels(Tensor::from_vec(labels, idx.len(), &self.device)?)
                .with_mask(self.set.masks(idx, &self.device)?),
        )
    }

    /// Judges standardised rows `x` drawn under motions `keys` (each as long as its key's
    /// motion): one verdict per row.
    pub fn judge(
        &self,
        oracle: &GroundOracle,
        x: &Tensor,
        keys: &[u32],
    ) -> Result<Vec<MotionVerdict>> {
        let rows = x.dim(0)?;
        if rows != keys.len() {
            bail!("motion judging: {rows} rows and {} keys", keys.len());
        }
        let values = self
            .norm
            .denormalize(&x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        let d = self.set.row_dim();
        if values.len() != rows * d {
            bail!(
                "motion judging: rows of {} values, motions of {} frames × {FEATURES} need {d}",
                values.len() / rows.max(1),
                self.set.frames
            );
        }
        keys.iter()
            .enumerate()
            .map(|(r, &k)| {
                let Some(&len) = self.set.lengths.get(k as usize) else {
                    bail!(
                        "motion judging: row {r} was drawn under motion {k}, the set has {}",
                        self.len()
                    );
                };
                oracle
                    .check(&values[r * d..(r + 1) * d], len)
                    .map_err(|e| candle_core::Error::msg(format!("motion {r}: {e}")))
            })
            .collect()
    }
}

/// Gen-neG's view of motions: a motion is drawn with the label and length of a training
/// motion (its key, chosen at random) and is one component, valid unless it penetrates
/// the ground.
pub struct MotionTask<'a> {
    pub data: &'a MotionData,
    pub oracle: GroundOracle,
}

impl Task for MotionTask<'_> {
    fn components(&self) -> usize {
        1
    }

    fn draw_keys(&self, n: usize, seed: u64) -> Result<Vec<u32>> {
        use rand::{Rng, SeedableRng};
        if self.data.is_empty() {
            bail!("motion draws: no motions to take labels and lengths from");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let len = self.data.len() as u32;
        Ok((0..n).map(|_| rng.random_range(0..len)).collect())
    }

    fn cond(&self, keys: &[u32]) -> Result<Cond> {
        self.data.cond_of(keys)
    }

    fn label(&self, x: &Tensor, keys: &[u32]) -> Result<Vec<bool>> {
        Ok(self
            .data
            .judge(&self.oracle, x, keys)?
            .iter()
            .map(|v| !v.infracting())
            .collect())
    }
}
