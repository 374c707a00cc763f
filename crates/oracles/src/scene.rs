//! Traffic scenes: vehicles as oriented rectangles on a rasterised road map.
//!
//! A scene is `agents × 7` values per row, each vehicle
//! `[x, y, length, width, cos θ, sin θ, speed]` (metres, metres per second; θ is the
//! heading, recovered with `atan2(sin, cos)` so unnormalised pairs from a model are fine).
//! Two constraints, judged per vehicle: **collision** (its footprint overlaps another's,
//! by the separating-axis test) and **offroad** (a point of its footprint — corners, edge
//! midpoints, centre — lies on a non-road cell or off the map).

use crate::{Oracle, Verdict};

/// Values per vehicle: x, y, length, width, cos θ, sin θ, speed.
pub const VEHICLE_FEATURES: usize = 7;

/// A vehicle's footprint: a rectangle centred at `(cx, cy)`, `length` along the heading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrientedBox {
    pub cx: f64,
    pub cy: f64,
    pub length: f64,
    pub width: f64,
    /// Radians, counter-clockwise from +x.
    pub heading: f64,
}

impl OrientedBox {
    /// The footprint of one vehicle's 7 features (negative sizes count by magnitude).
    pub fn from_features(f: &[f32]) -> Self {
        Self {
            cx: f[0] as f64,
            cy: f[1] as f64,
            length: (f[2] as f64).abs(),
            width: (f[3] as f64).abs(),
            heading: (f[5] as f64).atan2(f[4] as f64),
        }
    }

    /// Unit vectors along the length and along the width.
    pub fn axes(&self) -> [(f64, f64); 2] {
        let (s, c) = self.heading.sin_cos();
        [(c, s), (-s, c)]
    }

    /// The four corners, counter-clockwise.
    pub fn corners(&self) -> [(f64, f64); 4] {
        let [(ux, uy), (vx, vy)] = self.axes();
        let (hl, hw) = (self.length / 2.0, self.width / 2.0);
        [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)].map(|(a, b)| {
            (
                self.cx + a * hl * ux + b * hw * vx,
                self.cy + a * hl * uy + b * hw * vy,
            )
        })
    }

    /// Corners, edge midpoints and centre: the points the offroad check looks at.
    pub fn footprint_points(&self) -> [(f64, f64); 9] {
        let [(ux, uy), (vx, vy)] = self.axes();
        let (hl, hw) = (self.length / 2.0, self.width / 2.0);
        let mut out = [(0.0, 0.0); 9];
        let mut i = 0;
        for a in [-1.0, 0.0, 1.0] {
            for b in [-1.0, 0.0, 1.0] {
                out[i] = (
                    self.cx + a * hl * ux + b * hw * vx,
                    self.cy + a * hl * uy + b * hw * vy,
                );
                i += 1;
            }
        }
        out
    }

    /// Whether the point lies inside the rectangle (boundary included).
    pub fn contains(&self, x: f64, y: f64) -> bool {
        let [(ux, uy), (vx, vy)] = self.axes();
        let (dx, dy) = (x - self.cx, y - self.cy);
        (dx * ux + dy * uy).abs() <= self.length / 2.0
            && (dx * vx + dy * vy).abs() <= self.width / 2.0
    }

    /// The same rectangle with `margin` added on every side (negative shrinks, never below 0).
    pub fn grown(&self, margin: f64) -> Self {
        Self {
            length: (self.length + 2.0 * margin).max(0.0),
            width: (self.width + 2.0 * margin).max(0.0),
            ..*self
        }
    }

    /// Whether two rectangles overlap (touching counts), by the separating-axis theorem:
    /// convex shapes are disjoint iff their projections are disjoint on some edge normal.
    pub fn overlaps(&self, other: &OrientedBox) -> bool {
        // Cheap rejection by bounding circles first: most pairs in a scene are far apart.
        let r = |b: &OrientedBox| 0.5 * b.length.hypot(b.width);
        let (dx, dy) = (other.cx - self.cx, other.cy - self.cy);
        let reach = r(self) + r(other);
        if dx * dx + dy * dy > reach * reach {
            return false;
        }
        let half_extent = |b: &OrientedBox, (ax, ay): (f64, f64)| {
            let [(ux, uy), (vx, vy)] = b.axes();
            b.length / 2.0 * (ux * ax + uy * ay).abs() + b.width / 2.0 * (vx * ax + vy * ay).abs()
        };
        self.axes().into_iter().chain(other.axes()).all(|axis| {
            let centre_gap = (dx * axis.0 + dy * axis.1).abs();
            centre_gap <= half_extent(self, axis) + half_extent(other, axis)
        })
    }
}

/// A road map as a boolean raster over the square `[−half_size, half_size]²` (metres),
/// `cells × cells`, row 0 at the bottom (−y).
#[derive(Debug, Clone, PartialEq)]
pub struct RoadRaster {
    pub half_size: f64,
    pub cells: usize,
    /// Row-major, `true` on road.
    pub road: Vec<bool>,
}

impl RoadRaster {
    /// A raster where `is_road(x, y)` at each cell centre decides the cell.
    pub fn from_fn(half_size: f64, cells: usize, is_road: impl Fn(f64, f64) -> bool) -> Self {
        let side = 2.0 * half_size / cells as f64;
        let mut road = Vec::with_capacity(cells * cells);
        for row in 0..cells {
            for col in 0..cells {
                let x = -half_size + (col as f64 + 0.5) * side;
                let y = -half_size + (row as f64 + 0.5) * side;
                road.push(is_road(x, y));
            }
        }
        Self {
            half_size,
            cells,
            road,
        }
    }

    /// Side of one cell in metres.
    pub fn cell_size(&self) -> f64 {
        2.0 * self.half_size / self.cells as f64
    }

    /// Whether `(x, y)` falls on a road cell; off the map is never road.
    pub fn is_road(&self, x: f64, y: f64) -> bool {
        let side = self.cell_size();
        let col = ((x + self.half_size) / side).floor();
        let row = ((y + self.half_size) / side).floor();
        let n = self.cells as f64;
        // NaN compares false, so it is off the map too.
        if !(col >= 0.0 && col < n && row >= 0.0 && row < n) {
            return false;
        }
        self.road[row as usize * self.cells + col as usize]
    }

    /// Fraction of the map that is road.
    pub fn road_fraction(&self) -> f64 {
        self.road.iter().filter(|&&r| r).count() as f64 / self.road.len() as f64
    }

    /// Distance in metres from each cell's centre to the nearest road cell's centre
    /// (row-major like `road`; 0 on road, infinite on a map without road): the exact
    /// Euclidean distance transform, by the lower envelope of parabolas along columns
    /// then rows (Felzenszwalb & Huttenlocher 2012), in O(cells²).
    pub fn distance_to_road(&self) -> Vec<f64> {
        let n = self.cells;
        // Squared distances in cells; a large finite value stands for "no road" so
        // the parabolas stay comparable, and anything at least that large is infinite.
        let far = 4.0 * (n * n) as f64 + 1.0;
        let mut sq: Vec<f64> = self
            .road
            .iter()
            .map(|&r| if r { 0.0 } else { far })
            .collect();
        let mut line = vec![0f64; n];
        for col in 0..n {
            for row in 0..n {
                line[row] = sq[row * n + col];
            }
            let out = squared_distance_1d(&line);
            for row in 0..n {
                sq[row * n + col] = out[row];
            }
        }
        for row in 0..n {
            let out = squared_distance_1d(&sq[row * n..(row + 1) * n]);
            sq[row * n..(row + 1) * n].copy_from_slice(&out);
        }
        let side = self.cell_size();
        sq.into_iter()
            .map(|d| {
                if d >= far {
                    f64::INFINITY
                } else {
                    d.sqrt() * side
                }
            })
            .collect()
    }
}

/// `out[q] = min_p (q − p)² + f[p]`, the 1-D squared distance transform of `f`.
fn squared_distance_1d(f: &[f64]) -> Vec<f64> {
    let n = f.len();
    let mut out = vec![0f64; n];
    if n == 0 {
        return out;
    }
    // Parabola apexes of the lower envelope and the boundaries between them.
    let mut apex = vec![0usize; n];
    let mut bound = vec![0f64; n + 1];
    let mut k = 0;
    bound[0] = f64::NEG_INFINITY;
    bound[1] = f64::INFINITY;
    let cross = |q: usize, p: usize| {
        ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q as f64 - p as f64))
    };
    for q in 1..n {
        let mut s = cross(q, apex[k]);
        while s <= bound[k] {
            k -= 1;
            s = cross(q, apex[k]);
        }
        k += 1;
        apex[k] = q;
        bound[k] = s;
        bound[k + 1] = f64::INFINITY;
    }
    k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while bound[k + 1] < q as f64 {
            k += 1;
        }
        let d = q as f64 - apex[k] as f64;
        *o = d * d + f[apex[k]];
    }
    out
}

/// Per-vehicle verdicts of one scene.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SceneVerdict {
    /// Bit i is set when vehicle i overlaps another vehicle.
    pub collision: u64,
    /// Bit i is set when vehicle i is (partly) off the road.
    pub offroad: u64,
}

impl SceneVerdict {
    /// Bits of the vehicles breaking either constraint.
    pub fn infracting(&self) -> u64 {
        self.collision | self.offroad
    }

    pub fn is_valid(&self) -> bool {
        self.infracting() == 0
    }

    /// The scene-level verdict in [`SceneOracle::constraints`] order.
    pub fn verdict(&self) -> Verdict {
        Verdict::from_violations(
            u32::from(self.collision != 0) << SceneOracle::COLLISION
                | u32::from(self.offroad != 0) << SceneOracle::OFFROAD,
        )
    }
}

/// Judges the vehicles of one scene (`agents × 7` values) against each other and `map`.
///
/// # Panics
/// If `agents` holds more than 64 vehicles or its length is not a multiple of 7.
pub fn check_scene(map: &RoadRaster, agents: &[f32]) -> SceneVerdict {
    assert!(
        agents.len() % VEHICLE_FEATURES == 0 && agents.len() / VEHICLE_FEATURES <= 64,
        "a scene is at most 64 vehicles of {VEHICLE_FEATURES} values"
    );
    let boxes: Vec<OrientedBox> = agents
        .chunks_exact(VEHICLE_FEATURES)
        .map(OrientedBox::from_features)
        .collect();
    let mut v = SceneVerdict {
        collision: 0,
        offroad: 0,
    };
    for (i, a) in boxes.iter().enumerate() {
        if a.footprint_points()
            .iter()
            .any(|&(x, y)| !map.is_road(x, y))
        {
            v.offroad |= 1 << i;
        }
        for (j, b) in boxes.iter().enumerate().skip(i + 1) {
            if a.overlaps(b) {
                v.collision |= (1 << i) | (1 << j);
            }
        }
    }
    v
}

/// The scene oracle for one map: a sample is `agents × 7` values.
#[derive(Debug, Clone)]
pub struct SceneOracle<'a> {
    pub map: &'a RoadRaster,
    pub agents: usize,
}

impl SceneOracle<'_> {
    pub const COLLISION: usize = 0;
    pub const OFFROAD: usize = 1;
}

impl Oracle for SceneOracle<'_> {
    fn dim(&self) -> usize {
        self.agents * VEHICLE_FEATURES
    }

    fn constraints(&self) -> &[&'static str] {
        &["collision", "offroad"]
    }

    fn check(&self, x: &[f32]) -> Verdict {
        check_scene(self.map, x).verdict()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn distance_to_road_is_the_nearest_road_cell(
            cells in 1usize..12,
            bits in proptest::collection::vec(0u8..5, 144),
        ) {
            // Sparse road (one cell in five) so that distances are long and varied.
            let road: Vec<bool> = bits[..cells * cells].iter().map(|&b| b == 0).collect();
            let map = RoadRaster { half_size: 3.0, cells, road };
            let side = map.cell_size();
            let got = map.distance_to_road();
            for (i, &d) in got.iter().enumerate() {
                let (r, c) = ((i / cells) as f64, (i % cells) as f64);
                let want = (0..cells * cells)
                    .filter(|&j| map.road[j])
                    .map(|j| ((j / cells) as f64 - r).hypot((j % cells) as f64 - c) * side)
                    .fold(f64::INFINITY, f64::min);
                if want.is_infinite() {
                    prop_assert!(d.is_infinite());
                } else {
                    prop_assert!((d - want).abs() < 1e-9, "cell {i}: {d} against {want}");
                }
            }
        }
    }

    fn boxed(cx: f64, cy: f64, length: f64, width: f64, heading: f64) -> OrientedBox {
        OrientedBox {
            cx,
            cy,
            length,
            width,
            heading,
        }
    }

    /// Overlap by brute force: is some point of a fine grid inside both rectangles?
    fn raster_overlap(a: &OrientedBox, b: &OrientedBox, step: f64) -> bool {
        let bounds = |o: &OrientedBox| {
            let c = o.corners();
            let xs = c.map(|p| p.0);
            let ys = c.map(|p| p.1);
            (
                xs.iter().cloned().fold(f64::MAX, f64::min),
                xs.iter().cloned().fold(f64::MIN, f64::max),
                ys.iter().cloned().fold(f64::MAX, f64::min),
                ys.iter().cloned().fold(f64::MIN, f64::max),
            )
        };
        let (ax0, ax1, ay0, ay1) = bounds(a);
        let (bx0, bx1, by0, by1) = bounds(b);
        let (x0, x1, y0, y1) = (ax0.max(bx0), ax1.min(bx1), ay0.max(by0), ay1.min(by1));
        let mut y = y0;
        while y <= y1 {
            let mut x = x0;
            while x <= x1 {
                if a.contains(x, y) && b.contains(x, y) {
                    return true;
                }
                x += step;
            }
            y += step;
        }
        false
    }

    fn any_box() -> impl Strategy<Value = OrientedBox> {
        (
            -6.0f64..6.0,
            -6.0f64..6.0,
            0.5f64..8.0,
            0.5f64..3.0,
            -3.2f64..3.2,
        )
            .prop_map(|(cx, cy, l, w, h)| boxed(cx, cy, l, w, h))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The separating-axis test agrees with a rasterised check wherever the answer is
        /// robust: boxes that still overlap when shrunk by 0.1 m must share a grid point
        /// (step 0.02 m), and boxes that stay apart when grown by 0.1 m must share none.
        #[test]
        fn separating_axes_agree_with_rasterised_overlap(a in any_box(), b in any_box()) {
            let step = 0.02;
            if a.grown(-0.1).overlaps(&b.grown(-0.1)) {
                prop_assert!(raster_overlap(&a, &b, step));
            }
            if !a.grown(0.1).overlaps(&b.grown(0.1)) {
                prop_assert!(!raster_overlap(&a, &b, step));
            }
            prop_assert_eq!(a.overlaps(&b), b.overlaps(&a));
        }

        #[test]
        fn overlap_is_invariant_to_rigid_motion(
            a in any_box(), b in any_box(), shift in -50.0f64..50.0, turn in -3.2f64..3.2,
        ) {
            // Rotate both about the origin and shift: only robust cases, as above.
            prop_assume!(a.grown(-0.05).overlaps(&b.grown(-0.05)) || !a.grown(0.05).overlaps(&b.grown(0.05)));
            let (s, c) = turn.sin_cos();
            let moved = |o: &OrientedBox| boxed(
                c * o.cx - s * o.cy + shift, s * o.cx + c * o.cy - shift, o.length, o.width, o.heading + turn,
            );
            prop_assert_eq!(a.overlaps(&b), moved(&a).overlaps(&moved(&b)));
        }

        #[test]
        fn features_round_trip_the_heading(h in -3.1f64..3.1, scale in 0.1f32..10.0) {
            let f = [1.0, 2.0, 4.5, 1.8, h.cos() as f32 * scale, h.sin() as f32 * scale, 5.0];
            let b = OrientedBox::from_features(&f);
            prop_assert!((b.heading - h).abs() < 1e-5);
        }
    }

    #[test]
    fn known_overlaps() {
        let car = boxed(0.0, 0.0, 4.0, 2.0, 0.0);
        assert!(car.overlaps(&boxed(3.9, 0.0, 4.0, 2.0, 0.0)));
        assert!(!car.overlaps(&boxed(4.1, 0.0, 4.0, 2.0, 0.0)));
        // Bounding circles intersect, the boxes do not (a diagonal neighbour); nearer, a
        // corner of the turned box enters.
        assert!(car.overlaps(&boxed(2.6, 2.6, 4.0, 2.0, std::f64::consts::FRAC_PI_4)));
        assert!(!car.overlaps(&boxed(3.0, 3.0, 4.0, 2.0, std::f64::consts::FRAC_PI_4)));
        // Crossing at right angles: a plus sign.
        assert!(car.overlaps(&boxed(0.0, 0.0, 4.0, 2.0, std::f64::consts::FRAC_PI_2)));
    }

    #[test]
    fn scene_verdicts_name_the_vehicles() {
        // A horizontal road 8 m wide across a 40 m map.
        let map = RoadRaster::from_fn(20.0, 80, |_, y| y.abs() < 4.0);
        assert!((map.road_fraction() - 0.2).abs() < 1e-12);
        let car = |x: f32, y: f32| [x, y, 4.5, 1.8, 1.0, 0.0, 10.0];
        let scene: Vec<f32> = [
            car(-10.0, 1.5),
            car(-7.0, 1.6),
            car(5.0, -1.5),
            car(12.0, 3.5),
        ]
        .concat();
        let v = check_scene(&map, &scene);
        assert_eq!(v.collision, 0b0011);
        assert_eq!(v.offroad, 0b1000);
        assert_eq!(v.verdict().violations, 0b11);
        let oracle = SceneOracle {
            map: &map,
            agents: 4,
        };
        assert!(!oracle.check(&scene).valid);
        assert!(
            oracle
                .check(
                    &[
                        car(-10.0, 1.5),
                        car(10.0, -1.5),
                        car(0.0, 1.5),
                        car(15.0, 0.0)
                    ]
                    .concat()
                )
                .valid
        );
        // Off the map is off the road.
        assert!(!map.is_road(25.0, 0.0) && !map.is_road(f64::NAN, 0.0));
    }
}
