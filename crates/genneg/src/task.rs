//! What Gen-neG needs to know of an experiment.

use candle_core::{bail, DType, Result, Tensor};
use scoreguide_guidance::Cond;
use scoreguide_oracles::Oracle;

/// An experiment as Gen-neG sees it: where each drawn row's condition comes from, and
/// which components of a row are valid.
///
/// A row is drawn under a *key* (a scene's index, whose map conditions it; 0 for an
/// unconditioned model), so labelled sets store keys and rebuild conditions per batch
/// instead of holding them. A row has K components, each valid or not (K = 1 for a
/// checkerboard point; K = agents for a traffic scene, each vehicle in or out of a
/// collision or off the road): the classifier predicts each component, and a row is
/// valid iff all its components are.
pub trait Task {
    /// K, the labelled components of a row.
    fn components(&self) -> usize;

    /// Keys for draws `0 .. n` of a collection seeded by `seed`.
    fn draw_keys(&self, n: usize, seed: u64) -> Result<Vec<u32>>;

    /// The condition of rows drawn under `keys`.
    fn cond(&self, keys: &[u32]) -> Result<Cond>;

    /// Validity of each component of rows `x` (`[B, ...]`, the model's space) drawn under
    /// `keys`: B·K values, row-major.
    fn label(&self, x: &Tensor, keys: &[u32]) -> Result<Vec<bool>>;
}

/// An unconditioned model judged row by row by an [`Oracle`] (K = 1).
pub struct Unconditioned<'a>(pub &'a dyn Oracle);

impl Task for Unconditioned<'_> {
    fn components(&self) -> usize {
        1
    }

    fn draw_keys(&self, n: usize, _seed: u64) -> Result<Vec<u32>> {
        Ok(vec![0; n])
    }

    fn cond(&self, _keys: &[u32]) -> Result<Cond> {
        Ok(Cond::none())
    }

    fn label(&self, x: &Tensor, _keys: &[u32]) -> Result<Vec<bool>> {
        let dim = x.elem_count() / x.dim(0)?.max(1);
        if dim != self.0.dim() {
            bail!(
                "Gen-neG labelling: samples of {dim} values but the oracle judges {}",
                self.0.dim()
            );
        }
        let flat = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let verdicts = self
            .0
            .check_rows(&flat, dim)
            .map_err(|e| candle_core::Error::msg(format!("Gen-neG labelling: {e}")))?;
        Ok(verdicts.iter().map(|v| v.valid).collect())
    }
}
