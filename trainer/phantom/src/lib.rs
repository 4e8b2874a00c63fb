//! Synthetic chest X-ray phantoms: cartoons of a PA radiograph, with or without an effusion.
//!
//! Why: the pipeline (decode → preprocess → train → ONNX → serve) must be exercisable end to
//! end without patient data, in CI, demos and load tests. A phantom is a deterministic
//! function of its seed, so a dataset can be regenerated bit for bit instead of shipped.
//!
//! They are not realistic and a model trained on them means nothing clinically. They only
//! have to share the *structure* the real task has: a dark air-filled lung in a bright body,
//! heart, spine and ribs as confounders, and an effusion that is a dense, basal opacity with
//! a meniscus (higher laterally) that blunts the costophrenic angle.
//!
//! Rendering is a single pass of cheap arithmetic per pixel (soft-edged ellipses evaluated
//! on rotated coordinates, a triangle wave for ribs, an Irwin–Hall approximation of Gaussian
//! noise), so a 1024² phantom takes tens of milliseconds in an optimised build.

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Ground truth of a phantom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// Pleural effusion in one or both lungs.
    Effusion,
    /// A normal cartoon chest.
    NoFinding,
}

impl Finding {
    /// Class label and directory name, as in the real data's `labels.csv` (`label` column).
    pub fn label(self) -> &'static str {
        match self {
            Finding::Effusion => "effusion",
            Finding::NoFinding => "nofinding",
        }
    }

    /// NIH-style `finding_labels` value.
    pub fn finding_labels(self) -> &'static str {
        match self {
            Finding::Effusion => "Effusion",
            Finding::NoFinding => "No Finding",
        }
    }
}

/// How to render one phantom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhantomOptions {
    /// Width and height in pixels (default 1024, the NIH export size).
    pub size: u32,
    /// Seeds every random choice: anatomy, effusion, noise. Same seed, same pixels.
    pub seed: u64,
}

impl Default for PhantomOptions {
    fn default() -> Self {
        Self {
            size: 1024,
            seed: 0,
        }
    }
}

/// Counts of what [`write_dataset`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DatasetSummary {
    /// Images written.
    pub total: usize,
    /// Of which effusions.
    pub effusion: usize,
    /// Of which normal.
    pub no_finding: usize,
}

/// A soft-edged ellipse; the four semi-axes let one shape be asymmetric (a lung is wider
/// laterally than medially and taller above its centre than below).
#[derive(Debug, Clone, Copy)]
struct Blob {
    cx: f32,
    cy: f32,
    /// Inverse semi-axes for x < cx, x >= cx, y < cy, y >= cy.
    inv_left: f32,
    inv_right: f32,
    inv_up: f32,
    inv_down: f32,
    /// Half-width of the soft edge in squared-radius units.
    edge: f32,
}

impl Blob {
    fn new(cx: f32, cy: f32, left: f32, right: f32, up: f32, down: f32, edge: f32) -> Self {
        Self {
            cx,
            cy,
            inv_left: 1.0 / left,
            inv_right: 1.0 / right,
            inv_up: 1.0 / up,
            inv_down: 1.0 / down,
            edge,
        }
    }

    fn symmetric(cx: f32, cy: f32, ax: f32, ay: f32, edge: f32) -> Self {
        Self::new(cx, cy, ax, ax, ay, ay, edge)
    }

    /// 1 inside, 0 outside, smooth in between.
    #[inline]
    fn mask(&self, x: f32, y: f32) -> f32 {
        let dx = x - self.cx;
        let dy = y - self.cy;
        let u = dx
            * if dx < 0.0 {
                self.inv_left
            } else {
                self.inv_right
            };
        let v = dy * if dy < 0.0 { self.inv_up } else { self.inv_down };
        let r2 = u * u + v * v;
        if r2 >= 1.0 + self.edge {
            return 0.0; // most pixels are outside most shapes
        }
        smooth_step((1.0 + self.edge - r2) / (2.0 * self.edge))
    }
}

#[inline]
fn smooth_step(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// One lung field: a rounded apex and straight-ish sides (an ellipse whose lower semi-axis
/// reaches far below the base), cut from below by the dome of the hemidiaphragm. The cut
/// leaves the sharp lateral costophrenic angle that a small effusion blunts first.
#[derive(Debug, Clone, Copy)]
struct Lung {
    shape: Blob,
    /// Level of the costophrenic angle (the lowest point of the lung).
    base: f32,
    /// Rise of the diaphragm dome above `base` at its peak.
    dome: f32,
    dome_cx: f32,
    dome_inv_half_width: f32,
    /// Denser tissue (vessels, bronchi) around the hilum makes the medial lung less dark.
    hilum: Blob,
    /// Apex level, for sizing effusions.
    top: f32,
    medial_x: f32,
    lateral_x: f32,
}

impl Lung {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cx: f32,
        top: f32,
        base: f32,
        lateral: f32,
        medial: f32,
        dome: f32,
        lateral_sign: f32,
    ) -> Self {
        let height = base - top;
        let cy = top + 0.45 * height;
        let (left, right) = if lateral_sign < 0.0 {
            (lateral, medial)
        } else {
            (medial, lateral)
        };
        let medial_x = cx - lateral_sign * medial;
        Self {
            shape: Blob::new(cx, cy, left, right, cy - top, 2.5 * (base - cy), 0.10),
            base,
            dome,
            dome_cx: cx + lateral_sign * 0.15 * lateral,
            dome_inv_half_width: 1.0 / (0.5 * (lateral + medial)),
            hilum: Blob::symmetric(
                medial_x + lateral_sign * 0.02,
                cy + 0.1 * height,
                0.07,
                0.09,
                0.9,
            ),
            top,
            medial_x,
            lateral_x: cx + lateral_sign * lateral,
        }
    }

    /// 1 above the diaphragm dome, 0 below it.
    #[inline]
    fn above_diaphragm(&self, x: f32, y: f32) -> f32 {
        let s = ((x - self.dome_cx) * self.dome_inv_half_width).clamp(-1.0, 1.0);
        let diaphragm = self.base - self.dome * (1.0 - s * s);
        smooth_step((diaphragm - y) / 0.012)
    }

    /// 1 above the costophrenic angles: the lowest level fluid can occupy.
    #[inline]
    fn above_base(&self, y: f32) -> f32 {
        smooth_step((self.base + 0.006 - y) / 0.012)
    }
}

/// Fluid at the base of one lung.
#[derive(Debug, Clone, Copy)]
struct Effusion {
    /// Fluid level at the medial edge (image y, normalised).
    level: f32,
    /// How much higher the fluid climbs at the lateral chest wall.
    meniscus: f32,
    /// Lung x range mapped to 0 (medial) .. 1 (lateral).
    medial_x: f32,
    inv_span: f32,
    softness: f32,
}

impl Effusion {
    /// Fluid fraction and how deep below the surface the point lies (for a density gradient).
    #[inline]
    fn mask(&self, x: f32, y: f32) -> (f32, f32) {
        let s = ((x - self.medial_x) * self.inv_span).clamp(0.0, 1.0);
        // Concave-up surface: the level rises quadratically towards the chest wall.
        let top = self.level - self.meniscus * s * s;
        let depth = y - top;
        (smooth_step(depth / self.softness), depth)
    }
}

/// Every random choice of one phantom, drawn up front in a fixed order.
#[derive(Debug, Clone)]
struct Scene {
    cos: f32,
    sin: f32,
    shift_x: f32,
    shift_y: f32,
    body: Blob,
    /// Image-left lung (patient's right) and image-right lung (patient's left).
    lungs: [Lung; 2],
    effusions: [Option<Effusion>; 2],
    heart: Blob,
    mediastinum: Blob,
    spine_x: f32,
    spine_inv_half_width: f32,
    rib_spacing: f32,
    rib_offset: f32,
    rib_curvature: f32,
    clavicle_y: f32,
    background: f32,
    tissue: f32,
    air_fraction: f32,
    heart_gain: f32,
    spine_gain: f32,
    rib_gain: f32,
    fluid_gain: f32,
    gain: f32,
    offset: f32,
    noise_sigma: f32,
}

impl Scene {
    fn draw(finding: Finding, rng: &mut ChaCha8Rng) -> Self {
        let mut u = |lo: f32, hi: f32| rng.random_range(lo..hi);
        let angle = u(-3.0, 3.0).to_radians();
        let (shift_x, shift_y) = (u(-0.03, 0.03), u(-0.03, 0.03));
        let body = Blob::new(
            0.5,
            0.60,
            u(0.40, 0.46),
            u(0.40, 0.46),
            u(0.56, 0.62),
            0.6,
            0.08,
        );

        let top = u(0.14, 0.19);
        let base = u(0.64, 0.72);
        let lung_gap = u(0.17, 0.20);
        let lateral = u(0.13, 0.16);
        let medial = u(0.10, 0.12);
        // The heart pushes the left lung (image right) laterally, and the left hemidiaphragm
        // sits lower than the right.
        let left_drop = u(0.01, 0.03);
        let lungs = [
            Lung::new(
                0.5 - lung_gap,
                top,
                base,
                lateral,
                medial,
                u(0.04, 0.07),
                -1.0,
            ),
            Lung::new(
                0.5 + lung_gap + 0.01,
                top + 0.01,
                base + left_drop,
                lateral * 0.95,
                medial * 0.9,
                u(0.03, 0.06),
                1.0,
            ),
        ];
        // The heart sits on the diaphragm, bulging towards the patient's left (image right).
        let heart_height = u(0.12, 0.15);
        let heart = Blob::new(
            0.5 + u(0.02, 0.05),
            base - heart_height * u(0.55, 0.75),
            u(0.08, 0.10),
            u(0.13, 0.17),
            heart_height,
            heart_height * 0.8,
            0.35,
        );
        let mediastinum = Blob::new(0.5, top + 0.12, 0.06, 0.07, 0.20, 0.25, 0.5);

        let mut scene = Scene {
            cos: angle.cos(),
            sin: angle.sin(),
            shift_x,
            shift_y,
            body,
            lungs,
            effusions: [None, None],
            heart,
            mediastinum,
            spine_x: 0.5 + u(-0.005, 0.005),
            spine_inv_half_width: 1.0 / u(0.035, 0.045),
            rib_spacing: u(0.050, 0.060),
            rib_offset: u(0.0, 1.0),
            rib_curvature: u(0.8, 1.2),
            clavicle_y: top + u(0.02, 0.05),
            background: u(5.0, 30.0),
            tissue: u(130.0, 160.0),
            air_fraction: u(0.50, 0.65),
            heart_gain: u(30.0, 45.0),
            spine_gain: u(40.0, 60.0),
            rib_gain: u(22.0, 36.0),
            fluid_gain: u(2.0, 8.0),
            gain: u(0.85, 1.10),
            offset: u(-10.0, 10.0),
            noise_sigma: u(2.0, 6.0),
        };

        // Drawn for both classes so that the same seed gives the same anatomy and noise
        // with or without fluid: pairs then differ only where the effusion is.
        let side = u(0.0, 1.0);
        // From a blunted costophrenic angle (a few percent of the lung's height,
        // the subtle case readers miss) up to nearly half the lung; squaring
        // the draw makes small effusions common, as they are in practice.
        let small_to_large = |v: f32| 0.03 + 0.42 * v * v;
        let depth = [small_to_large(u(0.0, 1.0)), small_to_large(u(0.0, 1.0))];
        let meniscus = [u(0.03, 0.08), u(0.03, 0.08)];
        if finding == Finding::Effusion {
            // Right-sided effusions are the most common, bilateral ones the least.
            let sides = if side < 0.40 {
                [true, false]
            } else if side < 0.75 {
                [false, true]
            } else {
                [true, true]
            };
            for (i, lung) in scene.lungs.iter().enumerate() {
                if sides[i] {
                    scene.effusions[i] = Some(Effusion {
                        level: lung.base - depth[i] * (lung.base - lung.top),
                        meniscus: meniscus[i],
                        medial_x: lung.medial_x,
                        inv_span: 1.0 / (lung.lateral_x - lung.medial_x),
                        softness: 0.012,
                    });
                }
            }
        }
        scene
    }

    /// Noise-free intensity at normalised image coordinates (x right, y down, 0..1).
    #[inline]
    fn intensity(&self, x: f32, y: f32) -> f32 {
        let body = self.body.mask(x, y);
        if body <= 0.0 {
            return self.background;
        }
        let mut air = 0.0f32;
        let mut rib_region = 0.0f32;
        let mut fluid = 0.0f32;
        for (lung, effusion) in self.lungs.iter().zip(&self.effusions) {
            let shape = lung.shape.mask(x, y);
            if shape <= 0.0 {
                continue;
            }
            let m = shape * lung.above_diaphragm(x, y);
            // Fluid fills the lung shape down to the costophrenic angle, hiding the dome.
            let (e, depth) = effusion.map_or((0.0, 0.0), |eff| eff.mask(x, y));
            let above_base = lung.above_base(y);
            rib_region = rib_region.max(shape * above_base);
            // Layering fluid is a little denser at depth; the gradient keeps its lower edge
            // from standing out against the equally dense abdomen below.
            let filled = e * shape * above_base;
            fluid = fluid.max(filled * (0.5 + 5.0 * depth.clamp(0.0, 0.1)));
            let hilum = lung.hilum.mask(x, y);
            // `e`, not `filled`: scaling by the soft shape edge again would leave a dark rim.
            air = air.max(m * (1.0 - e) * (1.0 - 0.35 * hilum));
        }
        let heart = self.heart.mask(x, y);
        // The heart lies in front of the lungs and hides them where they overlap.
        air *= 1.0 - heart;

        let d = (x - self.spine_x).abs();
        let spine = smooth_step(1.5 - d * self.spine_inv_half_width);
        // Spine, mediastinum and heart overlap in projection; the densest one dominates.
        let central = (self.spine_gain * spine)
            .max(self.heart_gain * heart)
            .max(0.7 * self.spine_gain * self.mediastinum.mask(x, y));

        // Ribs: a triangle wave along arcs that sag laterally. Bone adds density whatever
        // lies behind it, so ribs stay visible through fluid, and every term of this sum only
        // grows with fluid: an effusion can brighten the image, never darken it.
        let rib = if rib_region > 0.0 {
            let arc = y - self.rib_curvature * d * d + 0.12 * d;
            let phase = arc / self.rib_spacing + self.rib_offset;
            let tri = (phase - phase.floor() - 0.5).abs(); // 0 at band centre, 0.5 between
            smooth_step((0.16 - tri) / 0.08) * rib_region
        } else {
            0.0
        };

        let cd = d - 0.17;
        let clavicle_d = (y - self.clavicle_y - 0.5 * cd * cd).abs();
        let clavicle = if clavicle_d < 0.02 {
            smooth_step((0.013 - clavicle_d) / 0.008)
                * smooth_step((0.33 - d) / 0.04)
                * smooth_step((d - 0.04) / 0.03)
        } else {
            0.0
        };

        let tissue = self.background + (self.tissue - self.background) * body;
        tissue * (1.0 - self.air_fraction * air)
            + central * body
            // Behind the dense heart the ribs lose most of their contrast.
            + self.rib_gain * rib * (1.0 - 0.6 * heart)
            + self.rib_gain * 0.9 * clavicle
            + self.fluid_gain * fluid
    }
}

/// Standard-normal sample from one 64-bit draw: the sum of four 16-bit uniforms (Irwin–Hall),
/// accurate enough for image noise and far cheaper than Box–Muller per pixel.
#[inline]
fn gaussian(bits: u64) -> f32 {
    let sum = (bits & 0xFFFF) + ((bits >> 16) & 0xFFFF) + ((bits >> 32) & 0xFFFF) + (bits >> 48);
    // Mean 2 * 65535, standard deviation 65536 * sqrt(4 / 12).
    (sum as f32 - 131_070.0) * (1.0 / 37_837.23)
}

/// Renders one 8-bit phantom.
pub fn render(finding: Finding, opts: &PhantomOptions) -> image::GrayImage {
    let size = opts.size;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let scene = Scene::draw(finding, &mut rng);
    let mut img = image::GrayImage::new(size, size);
    if size == 0 {
        return img;
    }
    let inv = 1.0 / size as f32;
    // Scene coordinates are image coordinates rotated about the centre and shifted; the map
    // is affine, so each row is a start point plus a constant step.
    let (step_x, step_y) = (scene.cos * inv, -scene.sin * inv);
    for (row, line) in img.chunks_exact_mut(size as usize).enumerate() {
        let py = (row as f32 + 0.5) * inv - 0.5;
        let px = 0.5 * inv - 0.5;
        let mut x = 0.5 + scene.cos * px + scene.sin * py - scene.shift_x;
        let mut y = 0.5 - scene.sin * px + scene.cos * py - scene.shift_y;
        for out in line.iter_mut() {
            let noise = gaussian(rng.next_u64()) * scene.noise_sigma;
            let v = scene.intensity(x, y) * scene.gain + scene.offset + noise;
            *out = v.round().clamp(0.0, 255.0) as u8;
            x += step_x;
            y += step_y;
        }
    }
    img
}

/// Renders one phantom as PNG bytes (8-bit gray).
pub fn render_png(finding: Finding, opts: &PhantomOptions) -> Vec<u8> {
    encode_png(&render(finding, opts))
}

fn encode_png(img: &image::GrayImage) -> Vec<u8> {
    let mut out = Vec::with_capacity(img.as_raw().len());
    // Fast compression: phantoms are noisy, so stronger settings buy little and cost time.
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::L8,
        )
        .expect("encoding a valid 8-bit gray image into memory cannot fail");
    out
}

/// Writes `n` phantoms and a `labels.csv` in the layout of the real NIH subset.
///
/// Files go to `out/effusion/phantom_NNNNN.png` and `out/nofinding/phantom_NNNNN.png`
/// (`NNNNN` is the image index, unique across both classes); existing files of the same name
/// are overwritten. `labels.csv` has the columns `image,label,finding_labels,view_position,
/// patient_id` with one patient per image, and is written last so that its presence means
/// the images are complete. Exactly `round(n * prevalence)` images are effusions, at indices
/// drawn from `seed`; image `i` is rendered with seed `seed + i`.
pub fn write_dataset(
    out: &Path,
    n: usize,
    prevalence: f64,
    size: u32,
    seed: u64,
) -> io::Result<DatasetSummary> {
    if !(0.0..=1.0).contains(&prevalence) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("prevalence must be within [0, 1], got {prevalence}"),
        ));
    }
    if size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "size must be at least 1",
        ));
    }
    let effusions = ((n as f64 * prevalence).round() as usize).min(n);
    let findings = assign_findings(n, effusions, seed);
    for finding in [Finding::Effusion, Finding::NoFinding] {
        fs::create_dir_all(out.join(finding.label()))?;
    }

    // Images are independent functions of their seeds, so workers can take them in any order
    // without affecting the output.
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
    let workers = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .min(n.max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || first_error.lock().map_or(true, |e| e.is_some()) {
                    break;
                }
                let finding = findings[i];
                let opts = PhantomOptions {
                    size,
                    seed: seed.wrapping_add(i as u64),
                };
                let path = out.join(finding.label()).join(image_name(i));
                if let Err(e) = fs::write(&path, render_png(finding, &opts)) {
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                    break;
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }

    let mut csv = String::from("image,label,finding_labels,view_position,patient_id\n");
    for (i, finding) in findings.iter().enumerate() {
        csv.push_str(&format!(
            "{},{},{},PA,P{i:05}\n",
            image_name(i),
            finding.label(),
            finding.finding_labels()
        ));
    }
    let tmp = out.join("labels.csv.tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(csv.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, out.join("labels.csv"))?;

    Ok(DatasetSummary {
        total: n,
        effusion: effusions,
        no_finding: n - effusions,
    })
}

fn image_name(index: usize) -> String {
    format!("phantom_{index:05}.png")
}

/// Exactly `effusions` of `n` indices get an effusion, spread at random (a partial
/// Fisher–Yates shuffle) rather than in a block, so any prefix has about the same prevalence.
fn assign_findings(n: usize, effusions: usize, seed: u64) -> Vec<Finding> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // A stream of its own, so labels do not reuse the random numbers of image `seed + 0`.
    rng.set_stream(1);
    let mut order: Vec<usize> = (0..n).collect();
    for i in 0..effusions {
        let j = rng.random_range(i..n);
        order.swap(i, j);
    }
    let mut findings = vec![Finding::NoFinding; n];
    for &i in &order[..effusions] {
        findings[i] = Finding::Effusion;
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleura::scan::{load_scan, Limits};
    use std::time::Instant;

    fn opts(size: u32, seed: u64) -> PhantomOptions {
        PhantomOptions { size, seed }
    }

    /// Mean over a box given in fractions of the image size.
    fn box_mean(img: &image::GrayImage, x0: f32, x1: f32, y0: f32, y1: f32) -> f32 {
        let s = img.width() as f32;
        let (xa, xb) = ((x0 * s) as u32, (x1 * s) as u32);
        let (ya, yb) = ((y0 * s) as u32, (y1 * s) as u32);
        let mut sum = 0u64;
        for y in ya..yb {
            for x in xa..xb {
                sum += u64::from(img.get_pixel(x, y).0[0]);
            }
        }
        sum as f32 / ((xb - xa) * (yb - ya)) as f32
    }

    #[test]
    fn renders_requested_size() {
        for size in [1u32, 64, 300] {
            let img = render(Finding::NoFinding, &opts(size, 1));
            assert_eq!(img.dimensions(), (size, size));
        }
        assert_eq!(PhantomOptions::default().size, 1024);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        for finding in [Finding::Effusion, Finding::NoFinding] {
            let a = render_png(finding, &opts(256, 42));
            let b = render_png(finding, &opts(256, 42));
            assert_eq!(a, b, "{finding:?}");
            assert_ne!(a, render_png(finding, &opts(256, 43)), "{finding:?}");
        }
    }

    #[test]
    fn looks_like_a_chest() {
        // Averaged over seeds, so the check is about the design, not one lucky draw.
        let (mut background, mut lungs, mut mediastinum) = (0.0, 0.0, 0.0);
        for seed in 0..8 {
            let img = render(Finding::NoFinding, &opts(256, seed));
            background += box_mean(&img, 0.0, 0.04, 0.0, 0.04);
            lungs += (box_mean(&img, 0.25, 0.38, 0.30, 0.50)
                + box_mean(&img, 0.62, 0.75, 0.30, 0.50))
                / 2.0;
            mediastinum += box_mean(&img, 0.47, 0.53, 0.30, 0.50);
        }
        assert!(
            background < lungs && lungs + 30.0 < mediastinum,
            "{background} {lungs} {mediastinum}"
        );
    }

    #[test]
    fn effusion_is_a_basal_opacity() {
        // Same seed: same anatomy and noise, so the pair differs only where the fluid is.
        let size = 256u32;
        let mut total_gain = 0.0f32;
        for seed in 0..12 {
            let normal = render(Finding::NoFinding, &opts(size, seed));
            let effusion = render(Finding::Effusion, &opts(size, seed));
            // Nothing changes in the upper quarter: fluid layers at the bases.
            let top_rows = (size / 4 * size) as usize;
            assert_eq!(
                normal.as_raw()[..top_rows],
                effusion.as_raw()[..top_rows],
                "seed {seed}"
            );
            // The lower lung zone of at least one side (effusions may be unilateral) is
            // denser; small effusions only blunt the angle, so the zone reaches down to
            // the bases and the bar per image is low, while the average must be clear.
            let lower = |img: &image::GrayImage| {
                [
                    box_mean(img, 0.20, 0.38, 0.50, 0.85),
                    box_mean(img, 0.62, 0.80, 0.50, 0.85),
                ]
            };
            let (n, e) = (lower(&normal), lower(&effusion));
            let gain = (e[0] - n[0]).max(e[1] - n[1]);
            assert!(
                gain > 0.1,
                "seed {seed}: lower zone only {gain} grey levels brighter"
            );
            // Fluid attenuates: it never makes a pixel darker.
            let darker = normal
                .as_raw()
                .iter()
                .zip(effusion.as_raw())
                .filter(|(a, b)| b < a)
                .count();
            assert_eq!(darker, 0, "seed {seed}: {darker} pixels darker");
            total_gain += gain;
        }
        let mean = total_gain / 12.0;
        eprintln!("mean lower-zone gain with effusion: {mean:.1} grey levels");
        assert!(mean > 5.0, "effusions are too faint on average: {mean}");
    }

    #[test]
    fn phantom_png_goes_through_load_scan() {
        for finding in [Finding::Effusion, Finding::NoFinding] {
            let png = render_png(finding, &opts(512, 7));
            let out = load_scan(&png, &Limits::default(), 256).unwrap();
            assert_eq!(out.len(), 256 * 256);
            let (lo, hi) = out
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            assert_eq!((lo, hi), (0.0, 1.0));
        }
    }

    #[test]
    fn write_dataset_layout_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let summary = write_dataset(dir.path(), 10, 0.25, 64, 5).unwrap();
        // round(2.5) rounds half away from zero.
        assert_eq!(
            summary,
            DatasetSummary {
                total: 10,
                effusion: 3,
                no_finding: 7
            }
        );

        let csv = fs::read_to_string(dir.path().join("labels.csv")).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some("image,label,finding_labels,view_position,patient_id")
        );
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        assert_eq!(rows.len(), 10);
        let mut patients = std::collections::HashSet::new();
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row[0], format!("phantom_{i:05}.png"));
            let finding = match row[1] {
                "effusion" => Finding::Effusion,
                "nofinding" => Finding::NoFinding,
                other => panic!("bad label {other}"),
            };
            assert_eq!(row[2], finding.finding_labels());
            assert_eq!(row[3], "PA");
            assert!(
                patients.insert(row[4].to_owned()),
                "patient ids must be unique"
            );
            // The file exists in its class directory and is exactly the seeded render.
            let bytes = fs::read(dir.path().join(row[1]).join(row[0])).unwrap();
            assert_eq!(bytes, render_png(finding, &opts(64, 5 + i as u64)));
            assert!(!dir.path().join(other_class(finding)).join(row[0]).exists());
        }
        assert_eq!(rows.iter().filter(|r| r[1] == "effusion").count(), 3);
        assert!(!dir.path().join("labels.csv.tmp").exists());

        // Regenerating is deterministic.
        let again = tempfile::tempdir().unwrap();
        write_dataset(again.path(), 10, 0.25, 64, 5).unwrap();
        assert_eq!(
            fs::read_to_string(again.path().join("labels.csv")).unwrap(),
            csv
        );
    }

    fn other_class(finding: Finding) -> &'static str {
        match finding {
            Finding::Effusion => Finding::NoFinding.label(),
            Finding::NoFinding => Finding::Effusion.label(),
        }
    }

    #[test]
    fn write_dataset_edge_cases() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            write_dataset(dir.path(), 4, 0.0, 16, 1).unwrap(),
            DatasetSummary {
                total: 4,
                effusion: 0,
                no_finding: 4
            }
        );
        assert_eq!(
            write_dataset(dir.path(), 4, 1.0, 16, 1).unwrap().effusion,
            4
        );
        assert_eq!(write_dataset(dir.path(), 0, 0.5, 16, 1).unwrap().total, 0);
        for bad in [-0.1, 1.5, f64::NAN] {
            let err = write_dataset(dir.path(), 4, bad, 16, 1).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        assert_eq!(
            write_dataset(dir.path(), 4, 0.5, 0, 1).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn assignment_is_exact_and_spread() {
        let findings = assign_findings(1000, 100, 9);
        assert_eq!(
            findings.iter().filter(|f| **f == Finding::Effusion).count(),
            100
        );
        // Not a block at either end.
        let first_half = findings[..500]
            .iter()
            .filter(|f| **f == Finding::Effusion)
            .count();
        assert!((30..=70).contains(&first_half), "{first_half}");
        assert_eq!(findings, assign_findings(1000, 100, 9));
    }

    #[test]
    fn gaussian_approximation_has_unit_moments() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let samples: Vec<f32> = (0..100_000).map(|_| gaussian(rng.next_u64())).collect();
        let mean = samples.iter().sum::<f32>() / samples.len() as f32;
        let var =
            samples.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / samples.len() as f32;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "{mean} {var}"
        );
    }

    /// Writes one phantom per class to /tmp and times rendering; `cargo test -- --ignored`.
    #[test]
    #[ignore = "writes images to /tmp for manual inspection"]
    fn dump_phantoms_for_inspection() {
        for (finding, seed) in [
            (Finding::Effusion, 3u64),
            (Finding::NoFinding, 3),
            (Finding::Effusion, 11),
        ] {
            let started = Instant::now();
            let img = render(finding, &opts(1024, seed));
            let rendered = started.elapsed();
            let png = encode_png(&img);
            eprintln!(
                "{finding:?} seed {seed}: render {rendered:?}, +png {:?}",
                started.elapsed()
            );
            fs::write(format!("/tmp/phantom-{}-{seed}.png", finding.label()), png).unwrap();
        }
    }
}
