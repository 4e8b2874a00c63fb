//! CXR-safe training augmentation on preprocessed images.
//!
//! Why these and only these: a frontal chest radiograph has a fixed orientation. The apices
//! are at the top and the costophrenic angles, where an effusion first shows as blunting and
//! a meniscus, are at the bottom. A vertical flip would put fluid at the apex, which never
//! happens, and teach the model that "basal" means nothing. A centre crop would cut off the
//! very bases and lateral angles the finding lives in. Neither is ever applied here.
//!
//! What is applied mimics real acquisition variation:
//! - a horizontal flip (effusions are left, right or bilateral; the heart side flips too,
//!   which the model should not rely on for this finding);
//! - one affine warp combining a small rotation (patient tilt), shift (positioning) and
//!   scale (source-to-detector distance, body habitus), resampled bilinearly at the same
//!   output size;
//! - brightness and contrast jitter (exposure and processing differences between sites);
//! - a little Gaussian noise (quantum mottle).
//!
//! Everything works on the output of `pleura::scan::load_scan` (`size`×`size`, row
//! major, one channel, values in `[0, 1]`) and returns an image of the same shape, clamped
//! to `[0, 1]` so the model never sees values that serving cannot produce.
//!
//! Randomness comes only from the [`ChaCha8Rng`] passed in, so a given seed reproduces an
//! augmentation exactly, whichever thread runs it (see [`image_rng`]).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Smallest scale factor [`affine`] accepts; guards the inverse mapping against division by
/// zero if a configuration asks for `max_scale >= 1`.
const MIN_SCALE: f64 = 1e-3;

/// Random augmentation ranges. Every range is symmetric around "no change".
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentConfig {
    /// Probability of a horizontal (left-right) flip. There is deliberately no vertical one.
    pub hflip_p: f64,
    /// Rotation drawn uniformly from `±max_rotate_deg` degrees.
    pub max_rotate_deg: f64,
    /// Shift along each axis drawn uniformly from `±max_shift`, as a fraction of the size.
    pub max_shift: f64,
    /// Scale factor drawn uniformly from `[1 - max_scale, 1 + max_scale]`.
    pub max_scale: f64,
    /// Additive brightness offset drawn uniformly from `±brightness` (intensity units, the
    /// image spans `[0, 1]`).
    pub brightness: f64,
    /// Contrast factor drawn uniformly from `[1 - contrast, 1 + contrast]`, applied around
    /// the image mean so overall brightness is left to [`AugmentConfig::brightness`].
    pub contrast: f64,
    /// Upper bound of the Gaussian noise standard deviation; each image draws its own
    /// standard deviation uniformly from `[0, noise_std]`, so some images stay clean.
    pub noise_std: f64,
}

impl Default for AugmentConfig {
    /// Mild, anatomy-preserving ranges: flip half the time, ±10°, ±6% shift and scale,
    /// ±0.1 brightness, ±15% contrast, noise up to 0.02.
    fn default() -> Self {
        Self {
            hflip_p: 0.5,
            max_rotate_deg: 10.0,
            max_shift: 0.06,
            max_scale: 0.06,
            brightness: 0.1,
            contrast: 0.15,
            noise_std: 0.02,
        }
    }
}

/// A setting of [`AugmentConfig`] outside its meaningful range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid augmentation setting {field} = {value}: {reason}")]
pub struct InvalidAugmentConfig {
    /// The field's name.
    pub field: &'static str,
    /// The rejected value.
    pub value: f64,
    /// What the field must satisfy.
    pub reason: &'static str,
}

impl AugmentConfig {
    /// The identity: every range zero, so [`augment`] returns its input unchanged.
    /// Useful to switch augmentation off without a separate code path.
    pub fn none() -> Self {
        Self {
            hflip_p: 0.0,
            max_rotate_deg: 0.0,
            max_shift: 0.0,
            max_scale: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            noise_std: 0.0,
        }
    }

    /// Checks that every field is finite and in range: probabilities within `[0, 1]`,
    /// magnitudes non-negative, and `max_scale` and `contrast` below 1 (a factor of zero or
    /// less would erase or invert the image).
    pub fn validate(&self) -> Result<(), InvalidAugmentConfig> {
        let fields = [
            ("hflip_p", self.hflip_p, 1.0 + f64::EPSILON),
            ("max_rotate_deg", self.max_rotate_deg, 180.0 + f64::EPSILON),
            ("max_shift", self.max_shift, 1.0 + f64::EPSILON),
            ("max_scale", self.max_scale, 1.0),
            ("brightness", self.brightness, 1.0 + f64::EPSILON),
            ("contrast", self.contrast, 1.0),
            ("noise_std", self.noise_std, 1.0 + f64::EPSILON),
        ];
        for (field, value, upper) in fields {
            if !value.is_finite() || value < 0.0 {
                return Err(InvalidAugmentConfig {
                    field,
                    value,
                    reason: "must be finite and non-negative",
                });
            }
            if value >= upper {
                return Err(InvalidAugmentConfig {
                    field,
                    value,
                    reason: "is out of range (probabilities, shifts, brightness and noise \
                             at most 1; scale and contrast below 1; rotation at most 180)",
                });
            }
        }
        Ok(())
    }
}

/// The random number generator for one image of one epoch.
///
/// Seeded by the epoch seed and using the sample index as the ChaCha stream, so each image
/// has its own independent stream and the result does not depend on which thread, or in
/// which order, images are augmented.
pub fn image_rng(epoch_seed: u64, sample_index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(epoch_seed);
    rng.set_stream(sample_index as u64);
    rng
}

/// Parameters of one geometric warp, see [`affine`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AffineParams {
    /// Rotation in degrees about the image centre; positive turns the content clockwise as
    /// displayed (rows run downwards).
    pub rotate_deg: f64,
    /// Horizontal shift as a fraction of the size; positive moves the content right.
    pub shift_x: f64,
    /// Vertical shift as a fraction of the size; positive moves the content down.
    pub shift_y: f64,
    /// Scale about the image centre; above 1 enlarges (zooms in on) the content.
    pub scale: f64,
}

impl AffineParams {
    /// No rotation, shift or scaling.
    pub const IDENTITY: AffineParams = AffineParams {
        rotate_deg: 0.0,
        shift_x: 0.0,
        shift_y: 0.0,
        scale: 1.0,
    };

    /// Whether the warp leaves every pixel where it is.
    pub fn is_identity(&self) -> bool {
        *self == Self::IDENTITY
    }
}

impl Default for AffineParams {
    fn default() -> Self {
        Self::IDENTITY
    }
}

/// Applies random augmentation from `cfg` to one `size`×`size` image in `[0, 1]`.
///
/// Order: horizontal flip, one affine warp (rotation, shift, scale), contrast and
/// brightness, noise; the result is clamped to `[0, 1]`. The same random numbers are drawn
/// whatever the configuration, so turning one augmentation off does not change the others'
/// draws for a given seed. With [`AugmentConfig::none`] the output equals the input.
///
/// # Panics
/// If `img.len() != size * size`.
pub fn augment(img: &[f32], size: usize, cfg: &AugmentConfig, rng: &mut ChaCha8Rng) -> Vec<f32> {
    check_shape(img, size);
    // Draw every parameter up front, in a fixed order (see above).
    let flip = rng.random::<f64>() < cfg.hflip_p;
    let params = AffineParams {
        rotate_deg: symmetric(rng, cfg.max_rotate_deg),
        shift_x: symmetric(rng, cfg.max_shift),
        shift_y: symmetric(rng, cfg.max_shift),
        scale: 1.0 + symmetric(rng, cfg.max_scale),
    };
    let contrast = 1.0 + symmetric(rng, cfg.contrast);
    let brightness = symmetric(rng, cfg.brightness);
    let noise_std = rng.random::<f64>() * cfg.noise_std;

    let mut out = if flip { hflip(img, size) } else { img.to_vec() };
    if !params.is_identity() {
        out = affine(&out, size, &params);
    }
    if contrast != 1.0 || brightness != 0.0 {
        out = brightness_contrast(&out, brightness, contrast);
    }
    if noise_std > 0.0 {
        out = add_noise(&out, noise_std, rng);
    }
    clamp_unit(&mut out);
    out
}

/// Mirrors the image left to right (column `x` becomes column `size - 1 - x`); rows stay
/// where they are.
///
/// # Panics
/// If `img.len() != size * size`.
pub fn hflip(img: &[f32], size: usize) -> Vec<f32> {
    check_shape(img, size);
    let mut out = Vec::with_capacity(img.len());
    for row in img.chunks_exact(size.max(1)) {
        out.extend(row.iter().rev());
    }
    out
}

/// Warps the image by one affine transform about its centre, sampled bilinearly, at the
/// same size.
///
/// Each output pixel is mapped back into the input (inverse mapping, so there are no holes)
/// and interpolated from its four neighbours. Points that land outside the input take the
/// nearest edge pixel's value (edge replication). Why edge replication rather than a
/// constant such as the minimum: after min-max normalisation the minimum is pure black,
/// which on a radiograph only occurs as air or collimation, and a black wedge would add a
/// hard artificial edge next to the bases and lateral angles where effusions appear.
/// Replicating the edge continues whatever anatomy or background is at the border, adds no
/// new extreme values, and the filled strips are thin at the small angles and shifts used.
///
/// # Panics
/// If `img.len() != size * size`.
pub fn affine(img: &[f32], size: usize, params: &AffineParams) -> Vec<f32> {
    check_shape(img, size);
    if size == 0 {
        return Vec::new();
    }
    let centre = (size as f64 - 1.0) / 2.0;
    let (sin, cos) = params.rotate_deg.to_radians().sin_cos();
    let inv_scale = 1.0 / params.scale.max(MIN_SCALE);
    let shift_x = params.shift_x * size as f64;
    let shift_y = params.shift_y * size as f64;
    let last = (size - 1) as f64;

    let mut out = Vec::with_capacity(img.len());
    for y in 0..size {
        let dy = (y as f64 - centre - shift_y) * inv_scale;
        for x in 0..size {
            let dx = (x as f64 - centre - shift_x) * inv_scale;
            // Inverse of a clockwise-on-screen rotation: rotate the offset back.
            let sx = (centre + cos * dx + sin * dy).clamp(0.0, last);
            let sy = (centre - sin * dx + cos * dy).clamp(0.0, last);
            out.push(bilinear(img, size, sx, sy));
        }
    }
    out
}

/// Scales contrast by `contrast` around the image mean, then adds `brightness`; clamps to
/// `[0, 1]`. Around the mean, so that a contrast change does not also shift brightness.
pub fn brightness_contrast(img: &[f32], brightness: f64, contrast: f64) -> Vec<f32> {
    if img.is_empty() {
        return Vec::new();
    }
    let mean = img.iter().map(|&v| f64::from(v)).sum::<f64>() / img.len() as f64;
    img.iter()
        .map(|&v| ((f64::from(v) - mean) * contrast + mean + brightness).clamp(0.0, 1.0) as f32)
        .collect()
}

/// Adds independent Gaussian noise of standard deviation `std` to every pixel; clamps to
/// `[0, 1]`.
pub fn add_noise(img: &[f32], std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(img.len());
    let mut spare: Option<f64> = None;
    for &v in img {
        // Box–Muller yields two independent normals per pair of uniforms; use both.
        let z = match spare.take() {
            Some(z) => z,
            None => {
                let (a, b) = standard_normal_pair(rng);
                spare = Some(b);
                a
            }
        };
        out.push((f64::from(v) + z * std).clamp(0.0, 1.0) as f32);
    }
    out
}

/// Two independent standard normal samples (Box–Muller). Implemented here because the
/// crate does not depend on `rand_distr`.
fn standard_normal_pair(rng: &mut ChaCha8Rng) -> (f64, f64) {
    // 1 - U is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

/// Uniform in `[-max, max]`; exactly zero when `max` is zero, so a disabled augmentation
/// is an exact identity.
fn symmetric(rng: &mut ChaCha8Rng, max: f64) -> f64 {
    (2.0 * rng.random::<f64>() - 1.0) * max
}

/// Bilinear interpolation at `(x, y)`, which the caller has clamped into the image.
fn bilinear(img: &[f32], size: usize, x: f64, y: f64) -> f32 {
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
    let (fx, fy) = (x - x0 as f64, y - y0 as f64);
    let at = |xx: usize, yy: usize| f64::from(img[yy * size + xx]);
    let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
    let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
    (top * (1.0 - fy) + bottom * fy) as f32
}

fn clamp_unit(img: &mut [f32]) {
    for v in img {
        *v = v.clamp(0.0, 1.0);
    }
}

fn check_shape(img: &[f32], size: usize) {
    assert_eq!(
        img.len(),
        size * size,
        "image has {} values, expected {size}x{size}",
        img.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: usize = 32;

    /// A deterministic image with structure in both axes: a horizontal and a vertical
    /// gradient plus an off-centre bright square, values within [0, 1].
    fn test_image(size: usize) -> Vec<f32> {
        let mut img = Vec::with_capacity(size * size);
        for y in 0..size {
            for x in 0..size {
                let mut v = 0.1 + 0.3 * x as f32 / size as f32 + 0.2 * y as f32 / size as f32;
                if (size / 5..size / 2).contains(&x) && (size / 4..size / 2).contains(&y) {
                    v = 0.95;
                }
                img.push(v);
            }
        }
        img
    }

    fn in_unit_range(img: &[f32]) -> bool {
        img.iter().all(|v| (0.0..=1.0).contains(v))
    }

    /// Intensity-weighted centre of mass, (x, y).
    fn centre_of_mass(img: &[f32], size: usize) -> (f64, f64) {
        let (mut sx, mut sy, mut total) = (0.0, 0.0, 0.0);
        for (i, &v) in img.iter().enumerate() {
            let v = f64::from(v);
            sx += v * (i % size) as f64;
            sy += v * (i / size) as f64;
            total += v;
        }
        (sx / total, sy / total)
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// A bright disc of radius `r` at (`cx`, `cy`) on black.
    fn disc(size: usize, cx: f64, cy: f64, r: f64) -> Vec<f32> {
        (0..size * size)
            .map(|i| {
                let (x, y) = ((i % size) as f64, (i / size) as f64);
                if (x - cx).powi(2) + (y - cy).powi(2) <= r * r {
                    1.0
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn every_augmentation_keeps_size_and_range() {
        let img = test_image(N);
        let mut rng = image_rng(1, 0);
        let strong = AffineParams {
            rotate_deg: 25.0,
            shift_x: 0.2,
            shift_y: -0.2,
            scale: 1.3,
        };
        let outputs = [
            hflip(&img, N),
            affine(&img, N, &strong),
            brightness_contrast(&img, 0.5, 1.8),
            brightness_contrast(&img, -0.5, 0.2),
            add_noise(&img, 0.3, &mut rng),
            augment(&img, N, &AugmentConfig::default(), &mut rng),
        ];
        for (i, out) in outputs.iter().enumerate() {
            assert_eq!(out.len(), N * N, "output {i}");
            assert!(in_unit_range(out), "output {i} leaves [0, 1]");
        }
        // Many default draws, including extreme brightness/noise combinations.
        for seed in 0..50 {
            let out = augment(&img, N, &AugmentConfig::default(), &mut image_rng(seed, 3));
            assert_eq!(out.len(), N * N);
            assert!(in_unit_range(&out), "seed {seed}");
        }
    }

    #[test]
    fn deterministic_under_a_seed() {
        let img = test_image(N);
        let cfg = AugmentConfig::default();
        let a = augment(&img, N, &cfg, &mut image_rng(7, 11));
        let b = augment(&img, N, &cfg, &mut image_rng(7, 11));
        assert_eq!(a, b);
        // Another epoch seed or another sample index gives another augmentation.
        assert_ne!(a, augment(&img, N, &cfg, &mut image_rng(8, 11)));
        assert_ne!(a, augment(&img, N, &cfg, &mut image_rng(7, 12)));
        assert_ne!(a, img);
    }

    #[test]
    fn hflip_mirrors_columns_and_is_an_involution() {
        let img = test_image(N);
        let flipped = hflip(&img, N);
        for y in 0..N {
            for x in 0..N {
                assert_eq!(flipped[y * N + x], img[y * N + (N - 1 - x)], "({x}, {y})");
            }
        }
        assert_ne!(flipped, img);
        assert_eq!(hflip(&flipped, N), img);
        // Odd sizes keep the middle column in place.
        let odd = test_image(5);
        let f = hflip(&odd, 5);
        assert_eq!(f[2], odd[2]);
        assert_eq!(f[0], odd[4]);
    }

    #[test]
    fn affine_with_zero_params_is_identity() {
        for size in [1, 2, 7, N] {
            let img = test_image(size);
            let out = affine(&img, size, &AffineParams::IDENTITY);
            assert!(max_abs_diff(&out, &img) <= 1e-6, "size {size}");
        }
        // A full turn is the identity too, up to rounding of sin/cos.
        let img = test_image(N);
        let turned = affine(
            &img,
            N,
            &AffineParams {
                rotate_deg: 360.0,
                ..AffineParams::IDENTITY
            },
        );
        assert!(max_abs_diff(&turned, &img) <= 1e-4);
    }

    #[test]
    fn small_rotation_keeps_centre_of_mass() {
        // An asymmetric image whose centre of mass is off the image centre: rotating about
        // the wrong point (e.g. the corner) would move it by many pixels.
        let img = test_image(N);
        let before = centre_of_mass(&img, N);
        let out = affine(
            &img,
            N,
            &AffineParams {
                rotate_deg: 3.0,
                ..AffineParams::IDENTITY
            },
        );
        let after = centre_of_mass(&out, N);
        assert!(max_abs_diff(&out, &img) > 0.05, "rotation changed nothing");
        let moved = ((after.0 - before.0).powi(2) + (after.1 - before.1).powi(2)).sqrt();
        assert!(moved < 1.0, "centre of mass moved {moved} px");
    }

    #[test]
    fn rotation_turns_clockwise_about_the_centre() {
        // A disc right of centre moves down (clockwise on screen) by about r*sin(angle).
        let size = 64;
        let c = (size as f64 - 1.0) / 2.0;
        let img = disc(size, c + 16.0, c, 4.0);
        let out = affine(
            &img,
            size,
            &AffineParams {
                rotate_deg: 90.0,
                ..AffineParams::IDENTITY
            },
        );
        let (x, y) = centre_of_mass(&out, size);
        assert!(
            (x - c).abs() < 0.5 && (y - (c + 16.0)).abs() < 0.5,
            "({x}, {y})"
        );
    }

    #[test]
    fn shift_and_scale_move_content_as_documented() {
        let size = 64;
        let c = (size as f64 - 1.0) / 2.0;
        let img = disc(size, c, c, 8.0);
        let shifted = affine(
            &img,
            size,
            &AffineParams {
                shift_x: 0.25,
                shift_y: -0.125,
                ..AffineParams::IDENTITY
            },
        );
        let (x, y) = centre_of_mass(&shifted, size);
        assert!(
            (x - (c + 16.0)).abs() < 0.5 && (y - (c - 8.0)).abs() < 0.5,
            "({x}, {y})"
        );

        let area = |im: &[f32]| im.iter().map(|&v| f64::from(v)).sum::<f64>();
        let zoomed = affine(
            &img,
            size,
            &AffineParams {
                scale: 1.5,
                ..AffineParams::IDENTITY
            },
        );
        let ratio = area(&zoomed) / area(&img);
        // Area grows with the square of the scale.
        assert!((ratio - 2.25).abs() < 0.2, "area ratio {ratio}");
        let (zx, zy) = centre_of_mass(&zoomed, size);
        assert!((zx - c).abs() < 0.3 && (zy - c).abs() < 0.3);
    }

    #[test]
    fn outside_pixels_replicate_the_edge() {
        // Shift the content right: the newly exposed left columns repeat the old first column.
        let img = test_image(N);
        let out = affine(
            &img,
            N,
            &AffineParams {
                shift_x: 0.25,
                ..AffineParams::IDENTITY
            },
        );
        for y in 0..N {
            for x in 0..N / 4 {
                assert!((out[y * N + x] - img[y * N]).abs() < 1e-6, "({x}, {y})");
            }
        }
    }

    #[test]
    fn never_flips_vertically() {
        // Bright top band over a dark body: with flips forced on and no rotation, every
        // augmentation must keep the bright band on top.
        let mut img = vec![0.2f32; N * N];
        for v in &mut img[..4 * N] {
            *v = 1.0;
        }
        let cfg = AugmentConfig {
            hflip_p: 1.0,
            max_rotate_deg: 0.0,
            ..AugmentConfig::default()
        };
        let row_mean = |im: &[f32], r: usize| im[r * N..(r + 1) * N].iter().sum::<f32>() / N as f32;
        for seed in 0..100 {
            let out = augment(&img, N, &cfg, &mut image_rng(seed, 0));
            let (top, bottom) = (row_mean(&out, 0), row_mean(&out, N - 1));
            assert!(top > bottom + 0.5, "seed {seed}: top {top} bottom {bottom}");
        }

        // And with only the flip on, the output is exactly the left-right mirror, which
        // differs from the up-down mirror of an image with vertical structure.
        let img = test_image(N);
        let only_flip = AugmentConfig {
            hflip_p: 1.0,
            ..AugmentConfig::none()
        };
        let out = augment(&img, N, &only_flip, &mut image_rng(0, 0));
        assert_eq!(out, hflip(&img, N));
        let vflip: Vec<f32> = img.chunks(N).rev().flatten().copied().collect();
        assert_ne!(out, vflip);
    }

    #[test]
    fn flip_probability_is_respected() {
        let img = test_image(N);
        let cfg = AugmentConfig {
            hflip_p: 0.5,
            ..AugmentConfig::none()
        };
        let flipped_img = hflip(&img, N);
        let mut flips = 0;
        for seed in 0..200 {
            let out = augment(&img, N, &cfg, &mut image_rng(seed, 0));
            if out == flipped_img {
                flips += 1;
            } else {
                assert_eq!(out, img, "seed {seed}: neither original nor mirror");
            }
        }
        assert!((70..=130).contains(&flips), "{flips} flips of 200");
    }

    #[test]
    fn none_is_identity() {
        let img = test_image(N);
        for seed in 0..20 {
            assert_eq!(
                augment(&img, N, &AugmentConfig::none(), &mut image_rng(seed, 5)),
                img
            );
        }
        assert!(AugmentConfig::none().validate().is_ok());
    }

    #[test]
    fn default_values_and_validation() {
        let d = AugmentConfig::default();
        assert_eq!(
            (d.hflip_p, d.max_rotate_deg, d.max_shift, d.max_scale),
            (0.5, 10.0, 0.06, 0.06)
        );
        assert_eq!((d.brightness, d.contrast, d.noise_std), (0.1, 0.15, 0.02));
        assert!(d.validate().is_ok());
        for bad in [
            AugmentConfig { hflip_p: 1.5, ..d },
            AugmentConfig {
                max_scale: 1.0,
                ..d
            },
            AugmentConfig {
                contrast: -0.1,
                ..d
            },
            AugmentConfig {
                noise_std: f64::NAN,
                ..d
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // Round-trips through JSON (it is recorded in the training report).
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<AugmentConfig>(&json).unwrap(), d);
    }

    #[test]
    fn brightness_and_contrast_act_as_documented() {
        let img = test_image(N);
        let mean = |im: &[f32]| im.iter().map(|&v| f64::from(v)).sum::<f64>() / im.len() as f64;
        let std = |im: &[f32]| {
            let m = mean(im);
            (im.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / im.len() as f64).sqrt()
        };
        // Contrast around the mean keeps the mean (no clipping at 0.8x).
        let low = brightness_contrast(&img, 0.0, 0.8);
        assert!((mean(&low) - mean(&img)).abs() < 1e-5);
        assert!((std(&low) / std(&img) - 0.8).abs() < 1e-4);
        // Brightness shifts every pixel (none clip at +0.02: max is 0.95).
        let bright = brightness_contrast(&img, 0.02, 1.0);
        assert!(bright
            .iter()
            .zip(&img)
            .all(|(b, a)| (b - a - 0.02).abs() < 1e-6));
        // Identity parameters are the identity.
        assert!(max_abs_diff(&brightness_contrast(&img, 0.0, 1.0), &img) < 1e-6);
    }

    #[test]
    fn noise_has_the_requested_spread() {
        let img = vec![0.5f32; 64 * 64];
        let noisy = add_noise(&img, 0.02, &mut image_rng(3, 0));
        let diffs: Vec<f64> = noisy.iter().map(|&v| f64::from(v) - 0.5).collect();
        let m = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let s = (diffs.iter().map(|d| (d - m).powi(2)).sum::<f64>() / diffs.len() as f64).sqrt();
        assert!(
            m.abs() < 0.002 && (s - 0.02).abs() < 0.002,
            "mean {m} std {s}"
        );
        assert_eq!(add_noise(&img, 0.0, &mut image_rng(3, 0)), img);
    }

    #[test]
    #[should_panic(expected = "expected 4x4")]
    fn wrong_shape_panics() {
        let _ = hflip(&[0.0; 15], 4);
    }
}
