//! Small PNG plots without a plotting dependency: scatter plots over shaded regions and
//! line charts, with a 5×7 bitmap font for titles and tick labels.

use candle_core::Result;
use std::path::Path;

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [225, 225, 225];
pub const BLUE: Rgb = [31, 119, 180];
pub const RED: Rgb = [214, 39, 40];
pub const ORANGE: Rgb = [255, 127, 14];
pub const GREEN: Rgb = [44, 160, 44];

/// An RGB raster with a data-coordinate window inside a margin.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<f32>,
    margin: (usize, usize, usize, usize), // left, right, top, bottom
    x_range: (f64, f64),
    y_range: (f64, f64),
}

impl Canvas {
    pub fn new(width: usize, height: usize, x_range: (f64, f64), y_range: (f64, f64)) -> Self {
        Self {
            width,
            height,
            pixels: vec![1.0; width * height * 3],
            margin: (60, 20, 36, 40),
            x_range,
            y_range,
        }
    }

    fn plot_area(&self) -> (usize, usize, usize, usize) {
        let (l, r, t, b) = self.margin;
        (l, self.width - r, t, self.height - b)
    }

    /// Data coordinates to pixel coordinates (may be outside the image).
    pub fn to_px(&self, x: f64, y: f64) -> (f64, f64) {
        let (x0, x1, y0, y1) = self.plot_area();
        let px =
            x0 as f64 + (x - self.x_range.0) / (self.x_range.1 - self.x_range.0) * (x1 - x0) as f64;
        let py =
            y1 as f64 - (y - self.y_range.0) / (self.y_range.1 - self.y_range.0) * (y1 - y0) as f64;
        (px, py)
    }

    fn blend(&mut self, px: i64, py: i64, c: Rgb, alpha: f32) {
        if px < 0 || py < 0 || px as usize >= self.width || py as usize >= self.height {
            return;
        }
        let i = (py as usize * self.width + px as usize) * 3;
        for (p, &ck) in self.pixels[i..i + 3].iter_mut().zip(&c) {
            *p = *p * (1.0 - alpha) + ck as f32 / 255.0 * alpha;
        }
    }

    /// Fills a rectangle given in data coordinates, clipped to the plot area.
    pub fn fill_rect(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb) {
        let (ax0, ax1, ay0, ay1) = self.plot_area();
        let (p0, q0) = self.to_px(x0, y1);
        let (p1, q1) = self.to_px(x1, y0);
        for py in (q0.round().max(ay0 as f64) as i64)..(q1.round().min(ay1 as f64) as i64) {
            for px in (p0.round().max(ax0 as f64) as i64)..(p1.round().min(ax1 as f64) as i64) {
                self.blend(px, py, c, 1.0);
            }
        }
    }

    /// Pixel coordinates to data coordinates.
    pub fn from_px(&self, px: f64, py: f64) -> (f64, f64) {
        let (x0, x1, y0, y1) = self.plot_area();
        (
            self.x_range.0
                + (px - x0 as f64) / (x1 - x0) as f64 * (self.x_range.1 - self.x_range.0),
            self.y_range.0
                + (y1 as f64 - py) / (y1 - y0) as f64 * (self.y_range.1 - self.y_range.0),
        )
    }

    /// Blends `c` over every plot-area pixel whose centre satisfies `inside(x, y)` (data
    /// coordinates) within the data-space box `[x0, x1] × [y0, y1]`.
    pub fn fill_where(
        &mut self,
        (x0, x1): (f64, f64),
        (y0, y1): (f64, f64),
        c: Rgb,
        alpha: f32,
        inside: impl Fn(f64, f64) -> bool,
    ) {
        let (ax0, ax1, ay0, ay1) = self.plot_area();
        let (p0, q0) = self.to_px(x0, y1);
        let (p1, q1) = self.to_px(x1, y0);
        for py in (q0.floor().max(ay0 as f64) as i64)..(q1.ceil().min(ay1 as f64) as i64) {
            for px in (p0.floor().max(ax0 as f64) as i64)..(p1.ceil().min(ax1 as f64) as i64) {
                let (x, y) = self.from_px(px as f64 + 0.5, py as f64 + 0.5);
                if inside(x, y) {
                    self.blend(px, py, c, alpha);
                }
            }
        }
    }

    /// A dot of radius `r` pixels, alpha-blended so dense regions darken.
    pub fn dot(&mut self, x: f64, y: f64, r: f64, c: Rgb, alpha: f32) {
        let (px, py) = self.to_px(x, y);
        let (ax0, ax1, ay0, ay1) = self.plot_area();
        let ri = r.ceil() as i64;
        for dy in -ri..=ri {
            for dx in -ri..=ri {
                if ((dx * dx + dy * dy) as f64) <= r * r {
                    let (qx, qy) = (px.round() as i64 + dx, py.round() as i64 + dy);
                    if qx >= ax0 as i64 && qx < ax1 as i64 && qy >= ay0 as i64 && qy < ay1 as i64 {
                        self.blend(qx, qy, c, alpha);
                    }
                }
            }
        }
    }

    /// A line between two data points (Bresenham on pixels), `w` pixels wide, clipped to
    /// the plot area.
    pub fn line(&mut self, a: (f64, f64), b: (f64, f64), c: Rgb, w: i64) {
        let (x0, y0) = self.to_px(a.0, a.1);
        let (x1, y1) = self.to_px(b.0, b.1);
        let (ax0, ax1, ay0, ay1) = self.plot_area();
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).clamp(1, 100_000);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            for dx in -(w / 2)..=(w / 2) {
                for dy in -(w / 2)..=(w / 2) {
                    let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
                    if px >= ax0 as i64 && px < ax1 as i64 && py >= ay0 as i64 && py < ay1 as i64 {
                        self.blend(px, py, c, 1.0);
                    }
                }
            }
        }
    }

    /// An arrow from `a` to `b` in data coordinates, with a two-stroke head.
    pub fn arrow(&mut self, a: (f64, f64), b: (f64, f64), c: Rgb) {
        self.line(a, b, c, 1);
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        for turn in [2.6f64, -2.6] {
            let (cs, sn) = (turn.cos(), turn.sin());
            let h = (
                b.0 + 0.3 * (dx * cs - dy * sn),
                b.1 + 0.3 * (dx * sn + dy * cs),
            );
            self.line(b, h, c, 1);
        }
    }

    /// Text at a pixel position in the 5×7 font, `scale` pixels per font pixel.
    pub fn text(&mut self, px: i64, py: i64, s: &str, scale: i64, c: Rgb) {
        let mut x = px;
        for ch in s.chars() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (1 << (4 - col)) != 0 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                self.blend(
                                    x + col * scale + sx,
                                    py + row as i64 * scale + sy,
                                    c,
                                    1.0,
                                );
                            }
                        }
                    }
                }
            }
            x += 6 * scale;
        }
    }

    /// Pixel width of `s` in the font.
    pub fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 6 * scale
    }

    /// Frame, ticks with labels at the given data values, and a title.
    pub fn axes(&mut self, title: &str, x_ticks: &[f64], y_ticks: &[f64]) {
        let (x0, x1, y0, y1) = self.plot_area();
        let (x0, x1, y0, y1) = (x0 as i64, x1 as i64, y0 as i64, y1 as i64);
        for x in x0..=x1 {
            self.blend(x, y0, BLACK, 1.0);
            self.blend(x, y1, BLACK, 1.0);
        }
        for y in y0..=y1 {
            self.blend(x0, y, BLACK, 1.0);
            self.blend(x1, y, BLACK, 1.0);
        }
        for &t in x_ticks {
            let (px, _) = self.to_px(t, self.y_range.0);
            let px = px.round() as i64;
            for d in 0..5 {
                self.blend(px, y1 + d, BLACK, 1.0);
            }
            let s = fmt_tick(t);
            self.text(px - Self::text_width(&s, 2) / 2, y1 + 9, &s, 2, BLACK);
        }
        for &t in y_ticks {
            let (_, py) = self.to_px(self.x_range.0, t);
            let py = py.round() as i64;
            for d in 0..5 {
                self.blend(x0 - d, py, BLACK, 1.0);
            }
            let s = fmt_tick(t);
            self.text(x0 - 8 - Self::text_width(&s, 2), py - 7, &s, 2, BLACK);
        }
        let w = Self::text_width(title, 2);
        self.text((self.width as i64 - w) / 2, 10, title, 2, BLACK);
    }

    /// Writes the canvas as an 8-bit RGB PNG, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        save_png(path, self.width, self.height, &self.pixels)
    }
}

/// Writes equally sized `panels` as one PNG, `cols` per row, left to right, top to
/// bottom (a figure of several plots, like the papers' grids).
pub fn save_grid(path: &Path, panels: &[Canvas], cols: usize) -> Result<()> {
    let Some(first) = panels.first() else {
        candle_core::bail!("figure {}: no panels", path.display());
    };
    let (w, h) = (first.width, first.height);
    if cols == 0 || panels.iter().any(|p| (p.width, p.height) != (w, h)) {
        candle_core::bail!(
            "figure {}: panels must share one size and cols > 0",
            path.display()
        );
    }
    let rows = panels.len().div_ceil(cols);
    let (gw, gh) = (w * cols, h * rows);
    let mut pixels = vec![1.0f32; gw * gh * 3];
    for (k, p) in panels.iter().enumerate() {
        let (ox, oy) = ((k % cols) * w, (k / cols) * h);
        for y in 0..h {
            let src = &p.pixels[y * w * 3..(y + 1) * w * 3];
            let dst = ((oy + y) * gw + ox) * 3;
            pixels[dst..dst + w * 3].copy_from_slice(src);
        }
    }
    save_png(path, gw, gh, &pixels)
}

pub(crate) fn save_png(path: &Path, width: usize, height: usize, pixels: &[f32]) -> Result<()> {
    crate::runtime::ensure_parent(path)?;
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err =
            |e: png::EncodingError| candle_core::Error::msg(format!("PNG {}: {e}", path.display()));
        let mut w = enc.write_header().map_err(err)?;
        let data: Vec<u8> = pixels
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        w.write_image_data(&data).map_err(err)?;
    }
    scoreguide_train::write_atomic(path, &bytes)
        .map_err(|e| candle_core::Error::msg(format!("writing {}: {e}", path.display())))
}

fn fmt_tick(t: f64) -> String {
    if t == t.round() && t.abs() < 1e6 {
        format!("{}", t as i64)
    } else if t.abs() >= 0.01 {
        let s = format!("{t:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{t:.0e}")
    }
}

/// Rows of a 5×7 glyph, most significant of the low 5 bits on the left.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        _ => [0; 7],
    }
}

/// A line chart of `series` (colour, points) over shared axes, y range fitted to the data
/// with 10% headroom; `x_ticks` label the x axis.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_ticks: &[f64],
    series: &[(Rgb, Vec<(f64, f64)>)],
) -> Result<()> {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut ylo, mut yhi) = pts.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    if !ylo.is_finite() {
        (ylo, yhi) = (0.0, 1.0);
    }
    let pad = ((yhi - ylo) * 0.1).max(1e-3 * yhi.abs().max(1e-3));
    let (ylo, yhi) = (ylo - pad, yhi + pad);
    let (xlo, xhi) = (
        x_ticks.first().copied().unwrap_or(0.0),
        x_ticks.last().copied().unwrap_or(1.0),
    );
    let xpad = 0.05 * (xhi - xlo).max(1.0);
    let y_ticks: Vec<f64> = (0..=4)
        .map(|k| ylo + pad + (yhi - ylo - 2.0 * pad) * k as f64 / 4.0)
        .collect();
    let mut c = Canvas::new(760, 480, (xlo - xpad, xhi + xpad), (ylo, yhi));
    // Room for the widest y label left of the axis.
    let widest = y_ticks
        .iter()
        .map(|&t| Canvas::text_width(&fmt_tick(t), 2))
        .max()
        .unwrap_or(0);
    c.margin.0 = c.margin.0.max(widest as usize + 16);
    for (colour, p) in series {
        for w in p.windows(2) {
            c.line(w[0], w[1], *colour, 3);
        }
        for q in p {
            c.dot(q.0, q.1, 6.0, *colour, 1.0);
        }
    }
    c.axes(title, x_ticks, &y_ticks);
    c.save(path)
}

/// One panel of grouped bars: for each group (x = 0, 1, …), one bar per series side by
/// side, y from 0 to the largest value with 10% headroom; a legend of the series' names.
pub fn bar_panel(title: &str, series: &[(&str, Rgb, Vec<f64>)]) -> Canvas {
    let groups = series.iter().map(|(_, _, v)| v.len()).max().unwrap_or(0);
    let top = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let mut c = Canvas::new(640, 360, (-0.5, groups as f64 - 0.5), (0.0, top));
    let width = 0.8 / series.len().max(1) as f64;
    for (s, (_, colour, values)) in series.iter().enumerate() {
        for (g, &v) in values.iter().enumerate() {
            let x0 = g as f64 - 0.4 + s as f64 * width;
            if v.is_finite() {
                c.fill_rect(x0, 0.0, x0 + width * 0.9, v, *colour);
            }
        }
    }
    let x_ticks: Vec<f64> = (0..groups).map(|g| g as f64).collect();
    let y_ticks: Vec<f64> = (0..=4).map(|k| top / 1.1 * k as f64 / 4.0).collect();
    c.axes(title, &x_ticks, &y_ticks);
    let mut x = 70;
    for (name, colour, _) in series {
        for dy in 0..12 {
            for dx in 0..12 {
                c.blend(x + dx, 40 + dy, *colour, 1.0);
            }
        }
        c.text(x + 16, 40, name, 2, BLACK);
        x += 16 + Canvas::text_width(name, 2) + 20;
    }
    c
}
