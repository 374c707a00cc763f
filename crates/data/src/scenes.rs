//! Procedural traffic scenes: an open stand-in for the Gen-neG paper's private data set.
//!
//! A map is one of three road layouts — a straight road, a crossing of two roads, a
//! curve — with one or two lanes of `lane_width` per direction and a paved `shoulder`
//! beyond the outer lanes (drivable, like the drivable area of real maps), rasterised
//! over a square of side `2 half_size` metres. A scene places `vehicles` vehicles on a
//! map's lanes (centred within their lane up to a small jitter, heading along it up to a
//! few degrees, cars and vans of realistic sizes, a speed), rejecting any placement whose
//! footprint comes within `gap` of another vehicle or leaves the road, so every generated
//! scene is valid under [`scoreguide_oracles::check_scene`]. Vehicles are in random order.

use candle_core::{bail, DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use scoreguide_checkpoint::Checkpoint;
use scoreguide_oracles::scene::VEHICLE_FEATURES;
use scoreguide_oracles::{check_scene, OrientedBox, RoadRaster};
use serde::{Deserialize, Serialize};
use std::f64::consts::{PI, TAU};
use std::path::Path;

/// Sizes of the generator. The defaults: a 64 m × 64 m map at 0.5 m per cell, 3.5 m
/// lanes with a 1 m shoulder, 12 vehicles at least 2 m apart (about the spacing of
/// stopped traffic; moving traffic keeps more).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SceneConfig {
    pub half_size: f64,
    pub raster_cells: usize,
    pub lane_width: f64,
    pub vehicles: usize,
    /// Smallest distance between two generated vehicles (metres).
    pub gap: f64,
    /// Drivable width beyond the outermost lane's edge (metres); vehicles are placed in
    /// lanes, so it is margin for the offroad check. Scene sets saved before it existed
    /// had none.
    #[serde(default)]
    pub shoulder: f64,
}

impl Default for SceneConfig {
    fn default() -> Self {
        Self {
            half_size: 32.0,
            raster_cells: 128,
            lane_width: 3.5,
            vehicles: 12,
            gap: 2.0,
            shoulder: 1.0,
        }
    }
}

impl SceneConfig {
    fn validate(&self) -> Result<()> {
        if !(self.half_size > 0.0
            && self.lane_width > 0.0
            && self.gap >= 0.0
            && self.shoulder >= 0.0)
        {
            bail!("scene config: half_size and lane_width must be positive, gap and shoulder non-negative, got {self:?}");
        }
        if self.raster_cells == 0 || self.vehicles == 0 || self.vehicles > 64 {
            bail!("scene config: need raster_cells > 0 and 1..=64 vehicles, got {self:?}");
        }
        Ok(())
    }
}

/// A lane's or road's centreline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
pub enum Centreline {
    /// From `(x, y)` along heading `angle` for `length` metres.
    Line {
        x: f64,
        y: f64,
        angle: f64,
        length: f64,
    },
    /// Around `(cx, cy)` at `radius`, from angle `start`, counter-clockwise when
    /// `sweep > 0`.
    Arc {
        cx: f64,
        cy: f64,
        radius: f64,
        start: f64,
        sweep: f64,
    },
}

impl Centreline {
    pub fn length(&self) -> f64 {
        match *self {
            Self::Line { length, .. } => length,
            Self::Arc { radius, sweep, .. } => radius * sweep.abs(),
        }
    }

    /// Position and heading `s` metres along the centreline.
    pub fn at(&self, s: f64) -> (f64, f64, f64) {
        match *self {
            Self::Line { x, y, angle, .. } => (x + s * angle.cos(), y + s * angle.sin(), angle),
            Self::Arc {
                cx,
                cy,
                radius,
                start,
                sweep,
            } => {
                let a = start + sweep.signum() * s / radius;
                let heading = a + sweep.signum() * PI / 2.0;
                (cx + radius * a.cos(), cy + radius * a.sin(), heading)
            }
        }
    }

    /// Distance from `(px, py)` to the centreline.
    pub fn distance(&self, px: f64, py: f64) -> f64 {
        self.nearest(px, py).0
    }

    /// Distance from `(px, py)` to the centreline and the centreline's heading at the
    /// nearest point.
    pub fn nearest(&self, px: f64, py: f64) -> (f64, f64) {
        match *self {
            Self::Line {
                x,
                y,
                angle,
                length,
            } => {
                let (ux, uy) = (angle.cos(), angle.sin());
                let t = ((px - x) * ux + (py - y) * uy).clamp(0.0, length);
                ((px - x - t * ux).hypot(py - y - t * uy), angle)
            }
            Self::Arc {
                cx,
                cy,
                radius,
                start,
                sweep,
            } => {
                let a = (py - cy).atan2(px - cx);
                // Inside the swept angle: the radial distance; else the nearer end.
                let along = (sweep.signum() * (a - start)).rem_euclid(TAU);
                if along <= sweep.abs() {
                    let (_, _, heading) = self.at(along * radius);
                    (((px - cx).hypot(py - cy) - radius).abs(), heading)
                } else {
                    let (x0, y0, h0) = self.at(0.0);
                    let (x1, y1, h1) = self.at(self.length());
                    let (d0, d1) = ((px - x0).hypot(py - y0), (px - x1).hypot(py - y1));
                    if d0 <= d1 {
                        (d0, h0)
                    } else {
                        (d1, h1)
                    }
                }
            }
        }
    }

    /// The centreline moved `d` metres to its left (negative: right).
    pub fn offset(&self, d: f64) -> Self {
        match *self {
            Self::Line {
                x,
                y,
                angle,
                length,
            } => Self::Line {
                x: x - d * angle.sin(),
                y: y + d * angle.cos(),
                angle,
                length,
            },
            Self::Arc {
                cx,
                cy,
                radius,
                start,
                sweep,
            } => Self::Arc {
                cx,
                cy,
                // Left of a counter-clockwise arc is towards its centre.
                radius: radius - sweep.signum() * d,
                start,
                sweep,
            },
        }
    }

    /// The same centreline travelled the other way.
    pub fn reversed(&self) -> Self {
        match *self {
            Self::Line {
                x,
                y,
                angle,
                length,
            } => Self::Line {
                x: x + length * angle.cos(),
                y: y + length * angle.sin(),
                angle: angle + PI,
                length,
            },
            Self::Arc {
                cx,
                cy,
                radius,
                start,
                sweep,
            } => Self::Arc {
                cx,
                cy,
                radius,
                start: start + sweep,
                sweep: -sweep,
            },
        }
    }
}

/// The kinds of road layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoadKind {
    Straight,
    Crossing,
    Curve,
}

/// A road: a centreline, lanes per direction, and the lanes' centrelines (right-hand
/// traffic: the lanes right of the centreline follow it, the others run reversed).
#[derive(Debug, Clone, PartialEq)]
pub struct Road {
    pub centre: Centreline,
    pub lanes_per_direction: usize,
    pub lane_width: f64,
}

impl Road {
    pub fn half_width(&self) -> f64 {
        self.lanes_per_direction as f64 * self.lane_width
    }

    pub fn lanes(&self) -> Vec<Centreline> {
        (0..self.lanes_per_direction)
            .flat_map(|i| {
                let d = (i as f64 + 0.5) * self.lane_width;
                [self.centre.offset(-d), self.centre.offset(d).reversed()]
            })
            .collect()
    }
}

/// A generated map: its layout and raster.
#[derive(Debug, Clone, PartialEq)]
pub struct RoadMap {
    pub kind: RoadKind,
    pub roads: Vec<Road>,
    pub raster: RoadRaster,
}

impl RoadMap {
    pub fn lanes(&self) -> Vec<Centreline> {
        self.roads.iter().flat_map(Road::lanes).collect()
    }

    /// Metres of lane centreline inside the map (at least `margin` from its edge).
    fn lane_length_inside(&self, half_size: f64, margin: f64) -> f64 {
        let step = 0.5;
        self.lanes()
            .iter()
            .map(|lane| {
                let n = (lane.length() / step) as usize;
                (0..n)
                    .filter(|&k| {
                        let (x, y, _) = lane.at(k as f64 * step);
                        x.abs() < half_size - margin && y.abs() < half_size - margin
                    })
                    .count() as f64
                    * step
            })
            .sum()
    }
}

/// One random map. Layouts are redrawn until their lanes inside the map can hold the
/// configured vehicles comfortably (14 m of lane per vehicle), so scenes never jam.
pub fn generate_map(cfg: &SceneConfig, rng: &mut StdRng) -> Result<RoadMap> {
    cfg.validate()?;
    let h = cfg.half_size;
    for _ in 0..1000 {
        let kind =
            [RoadKind::Straight, RoadKind::Crossing, RoadKind::Curve][rng.random_range(0..3)];
        let lanes = |rng: &mut StdRng| rng.random_range(1..=2);
        // A straight road through the map: heading, and offset of its centreline from
        // the map's centre; it extends 2 half_size beyond the centre either way.
        let straight = |rng: &mut StdRng, angle: f64| {
            let d = rng.random_range(-0.35 * h..0.35 * h);
            let (s, c) = angle.sin_cos();
            Centreline::Line {
                x: -d * s - 2.0 * h * c,
                y: d * c - 2.0 * h * s,
                angle,
                length: 4.0 * h,
            }
        };
        let roads = match kind {
            RoadKind::Straight => {
                let angle = rng.random_range(0.0..PI);
                vec![(straight(rng, angle), lanes(rng))]
            }
            RoadKind::Crossing => {
                let angle = rng.random_range(0.0..PI);
                let turn = PI / 2.0 + Normal::new(0.0, 0.15).expect("valid").sample(rng);
                vec![
                    (straight(rng, angle), lanes(rng)),
                    (straight(rng, angle + turn), lanes(rng)),
                ]
            }
            RoadKind::Curve => {
                // A quarter turn around a point near one of the map's corners.
                let corner = rng.random_range(0..4);
                let (sx, sy) = (
                    [1.0, -1.0, -1.0, 1.0][corner],
                    [1.0, 1.0, -1.0, -1.0][corner],
                );
                let cx = sx * h * rng.random_range(0.7..1.2);
                let cy = sy * h * rng.random_range(0.7..1.2);
                let radius = h * rng.random_range(0.9..1.5);
                let start = (-cy).atan2(-cx) - PI / 2.0;
                vec![(
                    Centreline::Arc {
                        cx,
                        cy,
                        radius,
                        start: start - 0.4,
                        sweep: PI + 0.8,
                    },
                    2,
                )]
            }
        };
        let roads: Vec<Road> = roads
            .into_iter()
            .map(|(centre, lanes_per_direction)| Road {
                centre,
                lanes_per_direction,
                lane_width: cfg.lane_width,
            })
            .collect();
        let raster = RoadRaster::from_fn(h, cfg.raster_cells, |x, y| {
            roads
                .iter()
                .any(|r| r.centre.distance(x, y) <= r.half_width() + cfg.shoulder)
        });
        let map = RoadMap {
            kind,
            roads,
            raster,
        };
        if map.lane_length_inside(h, 3.0) >= 14.0 * cfg.vehicles as f64 {
            return Ok(map);
        }
    }
    bail!("scene generator: no map in 1000 draws has room for {} vehicles of lane; make the map larger or the vehicles fewer", cfg.vehicles)
}

/// One valid scene on `map`: `vehicles × 7` values.
pub fn generate_scene(cfg: &SceneConfig, map: &RoadMap, rng: &mut StdRng) -> Result<Vec<f32>> {
    cfg.validate()?;
    let lanes = map.lanes();
    let jitter = Normal::new(0.0f64, 1.0).expect("valid");
    for _restart in 0..50 {
        let mut placed: Vec<[f32; VEHICLE_FEATURES]> = Vec::with_capacity(cfg.vehicles);
        let mut attempts = 0;
        while placed.len() < cfg.vehicles && attempts < 400 * cfg.vehicles {
            attempts += 1;
            let lane = lanes[rng.random_range(0..lanes.len())];
            let (x, y, heading) = lane.at(rng.random_range(0.0..lane.length()));
            if x.abs() > cfg.half_size - 2.0 || y.abs() > cfg.half_size - 2.0 {
                continue;
            }
            let van = rng.random::<f64>() < 0.15;
            let (length, width) = if van {
                (rng.random_range(5.5..7.5), rng.random_range(2.0..2.4))
            } else {
                (rng.random_range(3.8..5.2), rng.random_range(1.7..2.0))
            };
            let slack = ((cfg.lane_width - width) / 2.0 - 0.1).max(0.0);
            let lateral = (0.2 * jitter.sample(rng)).clamp(-slack, slack);
            let heading = heading + 0.03 * jitter.sample(rng);
            let (x, y) = (x - lateral * heading.sin(), y + lateral * heading.cos());
            let speed = rng.random_range(1.0..15.0);
            let v = [
                x as f32,
                y as f32,
                length as f32,
                width as f32,
                heading.cos() as f32,
                heading.sin() as f32,
                speed as f32,
            ];
            let candidate = OrientedBox::from_features(&v).grown(cfg.gap / 2.0);
            let clear = placed
                .iter()
                .all(|p| !candidate.overlaps(&OrientedBox::from_features(p).grown(cfg.gap / 2.0)));
            if clear && check_scene(&map.raster, &v).is_valid() {
                placed.push(v);
            }
        }
        if placed.len() == cfg.vehicles {
            return Ok(placed.concat());
        }
    }
    bail!(
        "scene generator: could not place {} vehicles on a {:?} map in 50 tries",
        cfg.vehicles,
        map.kind
    )
}

/// Which split of a data set: each has its own maps and scenes, from its own seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    fn seed_offset(self) -> u64 {
        match self {
            Self::Train => 0,
            Self::Validation => 1 << 40,
            Self::Test => 2 << 40,
        }
    }
}

/// Value of the `kind` metadata key of a saved scene set.
const SCENE_SET_KIND: &str = "traffic-scenes";

/// How maps are drawn for a network ([`SceneSet::render_maps`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MapLayers {
    /// One layer: the road fraction of each cell.
    #[default]
    Road,
    /// Four layers, like a rendered road image (the paper's maps are 3-channel
    /// renderings): the road fraction; lane centres (1 on a lane's centreline, falling
    /// linearly to 0 at its edges); and the direction of travel of the nearest lane as
    /// cos and sin, on the road only.
    RoadAndLanes,
    /// The four layers of `RoadAndLanes` and a fifth: the distance to the road,
    /// divided by [`DISTANCE_LAYER_REACH_M`] and clipped at 1. The other layers are flat
    /// off the road, so a network reading them at a vehicle far off it has no gradient
    /// that points back; this one rises steadily away from the road.
    RoadLanesAndDistance,
}

/// Distance from the road (metres) at which the distance layer of
/// [`MapLayers::RoadLanesAndDistance`] saturates at 1: a quarter of our scenes' side.
pub const DISTANCE_LAYER_REACH_M: f64 = 16.0;

impl MapLayers {
    pub fn channels(self) -> usize {
        match self {
            Self::Road => 1,
            Self::RoadAndLanes => 4,
            Self::RoadLanesAndDistance => 5,
        }
    }
}

/// Scenes and the maps they are on: scene `i` is `agents[i·A·7 .. (i+1)·A·7]` on map
/// `maps[map_index[i]]`, whose lanes' centrelines are `lanes[map_index[i]]` (empty for
/// scene sets saved before lanes were kept).
#[derive(Debug, Clone, PartialEq)]
pub struct SceneSet {
    pub config: SceneConfig,
    pub maps: Vec<RoadRaster>,
    pub kinds: Vec<RoadKind>,
    pub lanes: Vec<Vec<Centreline>>,
    pub map_index: Vec<u32>,
    pub agents: Vec<f32>,
}

/// A centreline as 6 numbers: (0, x, y, angle, length, 0) or (1, cx, cy, radius, start,
/// sweep), so that lanes are saved as an exact f64 tensor.
fn centreline_row(c: &Centreline) -> [f64; 6] {
    match *c {
        Centreline::Line {
            x,
            y,
            angle,
            length,
        } => [0.0, x, y, angle, length, 0.0],
        Centreline::Arc {
            cx,
            cy,
            radius,
            start,
            sweep,
        } => [1.0, cx, cy, radius, start, sweep],
    }
}

fn centreline_from_row(r: &[f64]) -> Result<Centreline> {
    if r.iter().any(|v| !v.is_finite()) {
        bail!("a lane centreline holds a non-finite value: {r:?}");
    }
    match r[0] {
        0.0 if r[4] >= 0.0 => Ok(Centreline::Line {
            x: r[1],
            y: r[2],
            angle: r[3],
            length: r[4],
        }),
        1.0 if r[3] > 0.0 => Ok(Centreline::Arc {
            cx: r[1],
            cy: r[2],
            radius: r[3],
            start: r[4],
            sweep: r[5],
        }),
        _ => bail!("not a lane centreline: {r:?}"),
    }
}

impl SceneSet {
    /// `scenes` scenes spread evenly over `maps` maps of `split`, from `seed`.
    pub fn generate(
        cfg: &SceneConfig,
        split: Split,
        maps: usize,
        scenes: usize,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        if maps == 0 || scenes == 0 {
            bail!(
                "scene set: need at least one map and one scene, got {maps} maps, {scenes} scenes"
            );
        }
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(split.seed_offset()));
        let road_maps = (0..maps)
            .map(|_| generate_map(cfg, &mut rng))
            .collect::<Result<Vec<_>>>()?;
        let mut map_index = Vec::with_capacity(scenes);
        let mut agents = Vec::with_capacity(scenes * cfg.vehicles * VEHICLE_FEATURES);
        for i in 0..scenes {
            let m = i % maps;
            map_index.push(m as u32);
            agents.extend(generate_scene(cfg, &road_maps[m], &mut rng)?);
        }
        Ok(Self {
            config: *cfg,
            kinds: road_maps.iter().map(|m| m.kind).collect(),
            lanes: road_maps.iter().map(RoadMap::lanes).collect(),
            maps: road_maps.into_iter().map(|m| m.raster).collect(),
            map_index,
            agents,
        })
    }

    pub fn len(&self) -> usize {
        self.map_index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map_index.is_empty()
    }

    /// Values per scene (vehicles × 7).
    pub fn scene_dim(&self) -> usize {
        self.config.vehicles * VEHICLE_FEATURES
    }

    pub fn scene(&self, i: usize) -> &[f32] {
        let d = self.scene_dim();
        &self.agents[i * d..(i + 1) * d]
    }

    pub fn map_of(&self, i: usize) -> &RoadRaster {
        &self.maps[self.map_index[i] as usize]
    }

    /// The vehicles as a `[N, vehicles, 7]` tensor.
    pub fn agents_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(
            &self.agents,
            (self.len(), self.config.vehicles, VEHICLE_FEATURES),
            device,
        )
    }

    /// The maps as `[M, 1, cells, cells]` road fractions (1 on road), averaged down from
    /// the raster to `cells` per side (which must divide the raster's).
    pub fn maps_tensor(&self, cells: usize, device: &Device) -> Result<Tensor> {
        self.averaged_down(cells, device, |map| {
            map.road.iter().map(|&on| f64::from(u8::from(on))).collect()
        })
    }

    /// `[M, 1, cells, cells]`: `per_cell`'s values on each map's raster, averaged over
    /// blocks of raster cells to `cells` per side (which must divide the raster's).
    fn averaged_down(
        &self,
        cells: usize,
        device: &Device,
        per_cell: impl Fn(&RoadRaster) -> Vec<f64>,
    ) -> Result<Tensor> {
        let full = self.config.raster_cells;
        if cells == 0 || full % cells != 0 {
            bail!("scene maps: {cells} cells per side does not divide the raster's {full}");
        }
        let f = full / cells;
        let mut v = vec![0f32; self.maps.len() * cells * cells];
        for (m, map) in self.maps.iter().enumerate() {
            for (k, value) in per_cell(map).into_iter().enumerate() {
                let (row, col) = (k / full / f, k % full / f);
                v[(m * cells + row) * cells + col] += (value / (f * f) as f64) as f32;
            }
        }
        Tensor::from_vec(v, (self.maps.len(), 1, cells, cells), device)
    }

    /// The maps drawn as `layers` (see [`MapLayers`]), `[M, channels, cells, cells]`,
    /// rows from y = −half_size up as in the raster. The road fraction and the distance
    /// layer are averaged down from the raster (`cells` must divide its side); the lane
    /// layers are evaluated at cell centres from the lanes' centrelines.
    pub fn render_maps(&self, cells: usize, layers: MapLayers, device: &Device) -> Result<Tensor> {
        let road = self.maps_tensor(cells, device)?;
        match layers {
            MapLayers::Road => Ok(road),
            MapLayers::RoadAndLanes => self.road_and_lane_layers(&road, cells, device),
            MapLayers::RoadLanesAndDistance => Tensor::cat(
                &[
                    self.road_and_lane_layers(&road, cells, device)?,
                    self.distance_layer(cells, device)?,
                ],
                1,
            ),
        }
    }

    /// `[M, 1, cells, cells]`: the distance from each raster cell to the road over
    /// [`DISTANCE_LAYER_REACH_M`], clipped at 1, averaged down to `cells` per side.
    fn distance_layer(&self, cells: usize, device: &Device) -> Result<Tensor> {
        self.averaged_down(cells, device, |map| {
            map.distance_to_road()
                .into_iter()
                .map(|d| (d / DISTANCE_LAYER_REACH_M).min(1.0))
                .collect()
        })
    }

    /// `[M, 4, cells, cells]`: `road` (the road fraction) and the lane layers of
    /// [`MapLayers::RoadAndLanes`].
    fn road_and_lane_layers(&self, road: &Tensor, cells: usize, device: &Device) -> Result<Tensor> {
        if self.lanes.len() != self.maps.len() || self.lanes.iter().any(Vec::is_empty) {
            bail!("scene maps: lane layers need the maps' lanes, which this scene set does not hold (saved before lanes were kept; generate it again)");
        }
        let road_v: Vec<f32> = road.flatten_all()?.to_vec1()?;
        let (h, half_lane) = (self.config.half_size, self.config.lane_width / 2.0);
        let side = 2.0 * h / cells as f64;
        let plane = cells * cells;
        let mut v = vec![0f32; self.maps.len() * 4 * plane];
        for (m, lanes) in self.lanes.iter().enumerate() {
            let out = &mut v[m * 4 * plane..(m + 1) * 4 * plane];
            for k in 0..plane {
                let (row, col) = (k / cells, k % cells);
                let (x, y) = (
                    -h + (col as f64 + 0.5) * side,
                    -h + (row as f64 + 0.5) * side,
                );
                let (d, heading) = lanes
                    .iter()
                    .map(|l| l.nearest(x, y))
                    .fold((f64::INFINITY, 0.0), |a, b| if b.0 < a.0 { b } else { a });
                let on_road = road_v[m * plane + k];
                out[k] = on_road;
                out[plane + k] = (1.0 - d / half_lane).max(0.0) as f32;
                out[2 * plane + k] = on_road * heading.cos() as f32;
                out[3 * plane + k] = on_road * heading.sin() as f32;
            }
        }
        Tensor::from_vec(v, (self.maps.len(), 4, cells, cells), device)
    }

    /// Saves as one safetensors file (atomically): `agents` f32 `[N, A, 7]`, `map_index`
    /// u32 `[N]`, `maps` u8 `[M, cells, cells]`, the lanes' centrelines `lanes` f64
    /// `[L, 6]` with their maps `lane_map` u32 `[L]`, the configuration and map kinds as
    /// metadata.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let dev = Device::Cpu;
        let cells = self.config.raster_cells;
        let mut c = Checkpoint::new();
        c.set_meta("kind", &SCENE_SET_KIND)?;
        c.set_meta("scene_config", &self.config)?;
        c.set_meta("map_kinds", &self.kinds)?;
        c.tensors.insert("agents".into(), self.agents_tensor(&dev)?);
        c.tensors.insert(
            "map_index".into(),
            Tensor::from_slice(&self.map_index, self.len(), &dev)?,
        );
        let raster: Vec<u8> = self
            .maps
            .iter()
            .flat_map(|m| m.road.iter().map(|&r| u8::from(r)))
            .collect();
        c.tensors.insert(
            "maps".into(),
            Tensor::from_vec(raster, (self.maps.len(), cells, cells), &dev)?,
        );
        if !self.lanes.is_empty() {
            let rows: Vec<f64> = self
                .lanes
                .iter()
                .flatten()
                .flat_map(centreline_row)
                .collect();
            let owner: Vec<u32> = (0..self.lanes.len() as u32)
                .flat_map(|m| std::iter::repeat_n(m, self.lanes[m as usize].len()))
                .collect();
            c.tensors.insert(
                "lanes".into(),
                Tensor::from_vec(rows, (owner.len(), 6), &dev)?,
            );
            c.tensors.insert(
                "lane_map".into(),
                Tensor::from_slice(&owner, owner.len(), &dev)?,
            );
        }
        c.save(path)
    }

    /// Loads a file written by [`SceneSet::save`], checking that its parts agree.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let named = |e: candle_core::Error| {
            candle_core::Error::msg(format!("scene set {}: {e}", path.display()))
        };
        let c = Checkpoint::load(path)?;
        Self::from_checkpoint(&c).map_err(named)
    }

    /// [`SceneSet::load`] on a file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::from_bytes(bytes)?)
    }

    fn from_checkpoint(c: &Checkpoint) -> Result<Self> {
        let kind: String = c.meta("kind")?;
        if kind != SCENE_SET_KIND {
            bail!("holds `{kind}`, not traffic scenes");
        }
        let config: SceneConfig = c.meta("scene_config")?;
        config.validate()?;
        let kinds: Vec<RoadKind> = c.meta("map_kinds")?;
        let get = |name: &str, dtype: DType| -> Result<Tensor> {
            let Some(t) = c.tensors.get(name) else {
                bail!("has no `{name}` tensor");
            };
            if t.dtype() != dtype {
                bail!("`{name}` is {:?}, expected {dtype:?}", t.dtype());
            }
            Ok(t.clone())
        };
        let agents = get("agents", DType::F32)?;
        let map_index = get("map_index", DType::U32)?;
        let maps = get("maps", DType::U8)?;
        let (n, a, f) = agents.dims3()?;
        let (m, rows, cols) = maps.dims3()?;
        let cells = config.raster_cells;
        if a != config.vehicles || f != VEHICLE_FEATURES {
            bail!(
                "`agents` is [{n}, {a}, {f}], expected [N, {}, {VEHICLE_FEATURES}]",
                config.vehicles
            );
        }
        if (rows, cols) != (cells, cells) || kinds.len() != m {
            bail!("`maps` is [{m}, {rows}, {cols}] with {} kinds, expected [M, {cells}, {cells}] with M kinds", kinds.len());
        }
        let map_index: Vec<u32> = map_index.to_vec1()?;
        if map_index.len() != n {
            bail!("`map_index` has {} entries for {n} scenes", map_index.len());
        }
        if let Some(bad) = map_index.iter().find(|&&i| i as usize >= m) {
            bail!("`map_index` refers to map {bad} of {m}");
        }
        let agents: Vec<f32> = agents.flatten_all()?.to_vec1()?;
        if let Some(i) = agents.iter().position(|v| !v.is_finite()) {
            bail!("`agents` holds a non-finite value in scene {}", i / (a * f));
        }
        let mut lanes = Vec::new();
        if c.tensors.contains_key("lanes") {
            let rows = get("lanes", DType::F64)?;
            let owner = get("lane_map", DType::U32)?;
            let (l, six) = rows.dims2()?;
            if six != 6 || owner.dims() != [l] {
                bail!(
                    "`lanes` is {:?} with `lane_map` {:?}, expected [L, 6] and [L]",
                    rows.dims(),
                    owner.dims()
                );
            }
            let rows: Vec<f64> = rows.flatten_all()?.to_vec1()?;
            lanes = vec![Vec::new(); m];
            for (r, &o) in rows.chunks_exact(6).zip(&owner.to_vec1::<u32>()?) {
                let Some(list) = lanes.get_mut(o as usize) else {
                    bail!("`lane_map` refers to map {o} of {m}");
                };
                list.push(centreline_from_row(r)?);
            }
        }
        let raster: Vec<u8> = maps.flatten_all()?.to_vec1()?;
        let maps = raster
            .chunks_exact(cells * cells)
            .map(|r| RoadRaster {
                half_size: config.half_size,
                cells,
                road: r.iter().map(|&v| v != 0).collect(),
            })
            .collect();
        Ok(Self {
            config,
            maps,
            kinds,
            lanes,
            map_index,
            agents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centrelines_measure_distance_and_offset() {
        let line = Centreline::Line {
            x: 0.0,
            y: 0.0,
            angle: 0.0,
            length: 10.0,
        };
        assert!((line.distance(5.0, 3.0) - 3.0).abs() < 1e-12);
        assert!((line.distance(13.0, 4.0) - 5.0).abs() < 1e-12);
        let left = line.offset(2.0);
        assert!((left.distance(5.0, 2.0)).abs() < 1e-12);
        let (x, y, h) = line.reversed().at(1.0);
        assert!((x - 9.0).abs() < 1e-12 && y.abs() < 1e-12 && (h - PI).abs() < 1e-12);

        let arc = Centreline::Arc {
            cx: 0.0,
            cy: 0.0,
            radius: 10.0,
            start: 0.0,
            sweep: PI / 2.0,
        };
        let (x, y, h) = arc.at(arc.length());
        assert!(x.abs() < 1e-9 && (y - 10.0).abs() < 1e-9 && (h - PI).abs() < 1e-9);
        assert!((arc.distance(0.0, 12.0) - 2.0).abs() < 1e-9);
        // Left of a counter-clockwise arc is inside it.
        assert!((arc.offset(1.0).distance(9.0, 0.0)).abs() < 1e-9);
        // The reversed arc starts where the original ends and turns clockwise.
        let (x, y, h) = arc.reversed().at(0.0);
        assert!(x.abs() < 1e-9 && (y - 10.0).abs() < 1e-9 && h.rem_euclid(TAU).abs() < 1e-9);
    }
}
