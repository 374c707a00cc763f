//! Scenes ready for a model, each with its map as the condition.

use super::{FeatureScaler, TrafficConfig};
use candle_core::{bail, Device, Result, Tensor};
use scoreguide_data::{Dataset, SceneSet};
use scoreguide_guidance::Cond;

/// Scenes ready for a model: standardised vehicles `[N, A·7]`, maps drawn as the
/// model's configuration asks (`[M, C, s, s]`), and which map each scene is on.
pub struct TrafficData {
    pub set: SceneSet,
    pub scaler: FeatureScaler,
    pub x: Dataset,
    pub maps: Tensor,
    pub map_index: Tensor,
}

impl TrafficData {
    /// The maps are drawn for networks of `cfg` (its layers, at its input side).
    pub fn new(
        set: SceneSet,
        scaler: FeatureScaler,
        cfg: &TrafficConfig,
        device: &Device,
    ) -> Result<Self> {
        if cfg.net.map_channels != cfg.map_layers.channels() {
            bail!(
                "traffic config: {:?} maps have {} layers, the network takes {}",
                cfg.map_layers,
                cfg.map_layers.channels(),
                cfg.net.map_channels
            );
        }
        let x = Tensor::from_vec(
            scaler.normalize(&set.agents),
            (set.len(), set.scene_dim()),
            device,
        )?;
        Ok(Self {
            x: Dataset::new(x, "traffic scenes")?,
            maps: set.render_maps(cfg.net.map_input_side(), cfg.map_layers, device)?,
            map_index: Tensor::from_slice(&set.map_index, set.len(), device)?,
            scaler,
            set,
        })
    }

    /// This data with `copies` copies of more scenes appended, scene k (`agents` in metres,
    /// `[n · A · 7]` values) on the map of this data's scene `scene_indices[k]`, in the
    /// same standardised units (the scaler is kept) and with the same rendered maps. For
    /// distilling where a teacher's own samples go as well as on the data; `copies` sets
    /// their share of the batches.
    pub fn with_scenes(
        &self,
        scene_indices: &[u32],
        agents: &[f32],
        copies: usize,
    ) -> Result<Self> {
        let dim = self.set.scene_dim();
        if agents.len() != scene_indices.len() * dim {
            bail!(
                "appended scenes: {} values for {} scenes of {dim}",
                agents.len(),
                scene_indices.len()
            );
        }
        if agents.iter().any(|v| !v.is_finite()) {
            bail!("appended scenes: the vehicles hold NaN or infinite values");
        }
        let maps = scene_indices
            .iter()
            .map(|&i| {
                self.set.map_index.get(i as usize).copied().ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "appended scenes: scene index {i} is not among the data's {} scenes",
                        self.set.len()
                    ))
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        let mut set = self.set.clone();
        for _ in 0..copies {
            set.map_index.extend_from_slice(&maps);
            set.agents.extend_from_slice(agents);
        }
        // Only the new rows are standardised; the maps are shared, not drawn again.
        let device = self.maps.device();
        let added = Tensor::from_vec(
            self.scaler.normalize(&set.agents[self.set.agents.len()..]),
            (copies * scene_indices.len(), dim),
            device,
        )?;
        Ok(Self {
            x: Dataset::new(Tensor::cat(&[self.x.tensor(), &added], 0)?, self.x.name())?,
            maps: self.maps.clone(),
            map_index: Tensor::from_slice(&set.map_index, set.len(), device)?,
            scaler: self.scaler.clone(),
            set,
        })
    }

    /// The condition of the scenes `idx`: their maps as the context.
    pub fn cond_of(&self, idx: &[u32]) -> Result<Cond> {
        Ok(Cond::context(self.maps_of(idx)?))
    }

    /// The maps of the scenes `idx`, `[len, C, s, s]`.
    pub fn maps_of(&self, idx: &[u32]) -> Result<Tensor> {
        let which = self
            .map_index
            .index_select(&Tensor::from_slice(idx, idx.len(), self.maps.device())?, 0)?;
        self.maps.index_select(&which, 0)
    }
}
