//! PNG output: sample grids and simple line plots, written with the `png` crate.

use std::path::Path;

use crate::train::write_atomic;
use crate::{Error, Result};

/// An 8-bit RGB canvas.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<[u8; 3]>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, bg: [u8; 3]) -> Self {
        Self {
            width,
            height,
            pixels: vec![bg; width * height],
        }
    }

    pub fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = c;
        }
    }

    /// A 1-px line (Bresenham).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// PNG bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc
                .write_header()
                .map_err(|e| Error::Usage(format!("png: {e}")))?;
            let flat: Vec<u8> = self.pixels.iter().flatten().copied().collect();
            w.write_image_data(&flat)
                .map_err(|e| Error::Usage(format!("png: {e}")))?;
        }
        Ok(out)
    }

    /// Writes the PNG atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.encode()?)
    }
}

/// Draws one image `[C, H, W]` (C = 1: grey, else the first three channels as RGB),
/// each pixel `scale`×`scale`, with its top-left corner at (x0, y0).
fn blit(
    canvas: &mut Canvas,
    img: &[u8],
    [c, h, w]: [usize; 3],
    scale: usize,
    x0: usize,
    y0: usize,
) {
    for y in 0..h * scale {
        for x in 0..w * scale {
            let (sy, sx) = (y / scale, x / scale);
            let px = |k: usize| img[k * h * w + sy * w + sx];
            let rgb = if c >= 3 {
                [px(0), px(1), px(2)]
            } else {
                [px(0); 3]
            };
            canvas.set((x0 + x) as i64, (y0 + y) as i64, rgb);
        }
    }
}

/// One row of `per_row` images per entry of `rows` (label, image bytes), the label drawn
/// in the left margin: e.g. the same latents sampled at several temperatures.
pub fn labelled_rows(
    rows: &[(String, Vec<u8>)],
    per_row: usize,
    shape: [usize; 3],
    scale: usize,
) -> Canvas {
    let [c, h, w] = shape;
    let (ch, cw) = (h * scale + 2, w * scale + 2);
    let font = 2;
    let margin = rows
        .iter()
        .map(|(l, _)| super::font::text_width(l, font))
        .max()
        .unwrap_or(0) as usize
        + 6;
    let mut canvas = Canvas::new(
        margin + per_row * cw + 2,
        rows.len().max(1) * ch + 2,
        [40, 40, 40],
    );
    for (r, (label, images)) in rows.iter().enumerate() {
        let y0 = 2 + r * ch;
        let ty = y0 as i64 + (h * scale) as i64 / 2 - 5;
        super::font::draw_text(&mut canvas, label, 3, ty, font, [230, 230, 230]);
        for i in 0..per_row.min(images.len() / (c * h * w)) {
            let img = &images[i * c * h * w..(i + 1) * c * h * w];
            blit(&mut canvas, img, shape, scale, margin + i * cw, y0);
        }
    }
    canvas
}

/// Lays out `n` images `[C, H, W]` (bytes, C = 1 or 3) in a near-square grid with 2-px gaps.
pub fn image_grid(images: &[u8], n: usize, shape: [usize; 3], scale: usize) -> Canvas {
    let [c, h, w] = shape;
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    let rows = n.div_ceil(cols).max(1);
    let (ch, cw) = (h * scale + 2, w * scale + 2);
    let mut canvas = Canvas::new(cols * cw + 2, rows * ch + 2, [40, 40, 40]);
    for i in 0..n {
        let (gy, gx) = (i / cols, i % cols);
        let img = &images[i * c * h * w..(i + 1) * c * h * w];
        blit(&mut canvas, img, shape, scale, 2 + gx * cw, 2 + gy * ch);
    }
    canvas
}

/// Decodes an 8-bit grayscale, gray+alpha, RGB or RGBA PNG to `([C, H, W], bytes)` with C = 1 or 3.
pub fn decode(bytes: &[u8], origin: &str) -> Result<([usize; 3], Vec<u8>)> {
    let err = |m: String| Error::Data(format!("{origin}: {m}"));
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec
        .read_info()
        .map_err(|e| err(format!("not a readable PNG ({e})")))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| err(format!("corrupt PNG ({e})")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let src_c = info.color_type.samples();
    let c = if src_c >= 3 { 3 } else { 1 };
    let mut out = vec![0u8; c * h * w];
    for y in 0..h {
        for x in 0..w {
            for k in 0..c {
                out[k * h * w + y * w + x] = buf[y * info.line_size + x * src_c + k];
            }
        }
    }
    Ok(([c, h, w], out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_encodes_and_decodes() {
        let imgs: Vec<u8> = (0..4 * 3 * 3).map(|v| (v * 7 % 256) as u8).collect();
        let g = image_grid(&imgs, 4, [1, 3, 3], 2);
        assert_eq!((g.width, g.height), (2 * 8 + 2, 2 * 8 + 2));
        let png = g.encode().unwrap();
        let (shape, px) = decode(&png, "grid").unwrap();
        assert_eq!(shape, [3, 18, 18]);
        // Image 0's first pixel lands at (2, 2), scaled ×2.
        assert_eq!(px[2 * 18 + 2], imgs[0]);
        assert!(decode(b"not a png", "x")
            .unwrap_err()
            .to_string()
            .contains("x: not a readable PNG"));
    }
}
