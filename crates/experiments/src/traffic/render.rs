//! Rendering scenes on their maps, like the paper's Fig. 1.

use crate::plot::{Canvas, Rgb, BLACK, BLUE, RED};
use scoreguide_oracles::scene::VEHICLE_FEATURES;
use scoreguide_oracles::{check_scene, OrientedBox, RoadRaster};

/// Road colour.
const ROAD: Rgb = [190, 190, 190];

/// One scene on its map as a square panel: road grey, valid vehicles blue, vehicles that
/// collide or leave the road red, each with a stroke from its centre along its heading.
pub fn scene_panel(title: &str, map: &RoadRaster, agents: &[f32], px: usize) -> Canvas {
    let h = map.half_size;
    let mut c = Canvas::new(px + 80, px + 56, (-h, h), (-h, h));
    c.fill_where((-h, h), (-h, h), ROAD, 1.0, |x, y| map.is_road(x, y));
    let verdict = check_scene(map, agents);
    for (i, v) in agents.chunks_exact(VEHICLE_FEATURES).enumerate() {
        let b = OrientedBox::from_features(v);
        let colour = if verdict.infracting() & (1 << i) != 0 {
            RED
        } else {
            BLUE
        };
        let r = 0.5 * b.length.hypot(b.width);
        c.fill_where(
            (b.cx - r, b.cx + r),
            (b.cy - r, b.cy + r),
            colour,
            0.75,
            |x, y| b.contains(x, y),
        );
        let [(ux, uy), _] = b.axes();
        let nose = (b.cx + 0.5 * b.length * ux, b.cy + 0.5 * b.length * uy);
        c.line((b.cx, b.cy), nose, BLACK, 1);
    }
    let ticks = [-h, 0.0, h];
    c.axes(title, &ticks, &ticks);
    c
}
