//! Figures of the evaluate and report stages, each written as PNG and SVG with plotters: the
//! reliability diagram and confidence histogram of a model (the paper's Figs. 11–14), its
//! per-class training-loss curves (Fig. 8) and penultimate-layer projection (Fig. 7), and the
//! report's accuracy-against-ECE scatter (Fig. 10), per-class F1 against confidence (Fig. 4) and
//! the difference from Vanilla against the student's size (Fig. 3, as a [`Grid`] of plots),
//! a model's mean output over the images of its best class ([`ClassBars`], Fig. 5), and training
//! images with the labels they were taught ([`ImageGrid`], PNG only, Fig. 6).
//!
//! Text is drawn with the DejaVu Sans font embedded in the binary (`assets/`, Bitstream Vera
//! licence), so figures look the same on every machine and need no system fonts.

use super::metrics::{BestClass, Bin};
use crate::error::{Result, StageError};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const SANS: &str = "sans-serif";

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font checked in with the source.
        let _ = plotters::style::register_font(SANS, FontStyle::Normal, FONT);
    });
}

/// Colours of successive series (Tableau 10).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Something drawable on any plotters backend.
pub trait Figure {
    /// Draws the figure on `root` (already filled white).
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String>;

    /// The height, at least `height`, that the figure needs at `width` pixels: more than asked
    /// when its legend would not fit.
    fn height_for(&self, _width: u32, height: u32) -> u32 {
        height
    }
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// Renders `fig` to `<dir>/<stem>.svg` and `<dir>/<stem>.png` (`size` pixels), each written
/// atomically; returns the two file names.
pub fn save<F: Figure>(fig: &F, dir: &Path, stem: &str, size: (u32, u32)) -> Result<Vec<String>> {
    register_font();
    let size = (size.0, fig.height_for(size.0, size.1));
    let fail = |what: &str, e: String| {
        StageError::invalid(dir.join(format!("{stem}.{what}")), "figure", e)
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail("svg", err(e)))?;
        fig.draw(&root).map_err(|e| fail("svg", e))?;
        root.present().map_err(|e| fail("svg", err(e)))?;
    }
    let png_name = save_png(fig, dir, stem, size)?.remove(0);
    let svg_name = format!("{stem}.svg");
    datasets::atomic::write_bytes(&dir.join(&svg_name), svg.as_bytes())?;
    Ok(vec![png_name, svg_name])
}

/// Renders `fig` to `<dir>/<stem>.png` only (a figure of images: as SVG they would be a
/// rectangle per pixel), written atomically; returns the file name.
pub fn save_png<F: Figure>(
    fig: &F,
    dir: &Path,
    stem: &str,
    size: (u32, u32),
) -> Result<Vec<String>> {
    register_font();
    let size = (size.0, fig.height_for(size.0, size.1));
    let png_name = format!("{stem}.png");
    let fail = |e: String| StageError::invalid(dir.join(&png_name), "figure", e);
    let mut rgb = vec![255u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(err(e)))?;
        fig.draw(&root).map_err(fail)?;
        root.present().map_err(|e| fail(err(e)))?;
    }
    let image = image::RgbImage::from_raw(size.0, size.1, rgb).expect("buffer of w × h × 3");
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| fail(e.to_string()))?;
    datasets::atomic::write_bytes(&dir.join(&png_name), &png.into_inner())?;
    Ok(vec![png_name])
}

/// A reliability diagram: accuracy per confidence bin against the diagonal, the gap to each
/// bin's mean confidence shaded, the sample count over each bar.
pub struct Reliability<'a> {
    /// Title, e.g. the model and its accuracy and ECE.
    pub title: String,
    /// The bins.
    pub bins: &'a [Bin],
}

impl Figure for Reliability<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (SANS, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1.08f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("confidence")
            .y_desc("accuracy")
            .label_style((SANS, 13))
            .disable_mesh()
            .draw()
            .map_err(err)?;
        let blue = PALETTE[0];
        chart
            .draw_series(self.bins.iter().filter(|b| b.count > 0).map(|b| {
                Rectangle::new([(b.lo, 0.0), (b.hi, b.accuracy)], blue.mix(0.85).filled())
            }))
            .map_err(err)?
            .label("accuracy")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], blue.filled()));
        let red = PALETTE[3];
        chart
            .draw_series(self.bins.iter().filter(|b| b.count > 0).map(|b| {
                let (lo, hi) = if b.accuracy < b.confidence {
                    (b.accuracy, b.confidence)
                } else {
                    (b.confidence, b.accuracy)
                };
                Rectangle::new([(b.lo, lo), (b.hi, hi)], red.mix(0.35).filled())
            }))
            .map_err(err)?
            .label("gap to mean confidence")
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], red.mix(0.35).filled())
            });
        chart
            .draw_series(
                self.bins.iter().filter(|b| b.count > 0).map(|b| {
                    Rectangle::new([(b.lo, 0.0), (b.hi, b.accuracy)], BLACK.stroke_width(1))
                }),
            )
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK));
        chart
            .draw_series(self.bins.iter().filter(|b| b.count > 0).map(|b| {
                Text::new(
                    b.count.to_string(),
                    (
                        (b.lo + b.hi) / 2.0 - 0.02,
                        b.accuracy.max(b.confidence) + 0.05,
                    ),
                    (SANS, 10),
                )
            }))
            .map_err(err)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((SANS, 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)
    }
}

/// The distribution of confidences over the bins, with the accuracy and mean confidence marked.
pub struct ConfidenceHistogram<'a> {
    /// Title.
    pub title: String,
    /// The bins.
    pub bins: &'a [Bin],
    /// Top-1 accuracy.
    pub accuracy: f64,
}

impl Figure for ConfidenceHistogram<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let n: usize = self.bins.iter().map(|b| b.count).sum();
        let frac = |b: &Bin| b.count as f64 / n.max(1) as f64;
        let top = self.bins.iter().map(frac).fold(0.0, f64::max).max(0.01) * 1.15;
        let mean_conf = self
            .bins
            .iter()
            .map(|b| b.confidence * b.count as f64)
            .sum::<f64>()
            / n.max(1) as f64;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (SANS, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("confidence")
            .y_desc("fraction of samples")
            .label_style((SANS, 13))
            .disable_mesh()
            .draw()
            .map_err(err)?;
        chart
            .draw_series(self.bins.iter().map(|b| {
                Rectangle::new(
                    [(b.lo, 0.0), (b.hi, frac(b))],
                    PALETTE[0].mix(0.85).filled(),
                )
            }))
            .map_err(err)?;
        for (x, colour, label) in [
            (self.accuracy, PALETTE[3], "accuracy"),
            (mean_conf, PALETTE[2], "mean confidence"),
        ] {
            chart
                .draw_series(LineSeries::new(
                    [(x, 0.0), (x, top)],
                    colour.stroke_width(2),
                ))
                .map_err(err)?
                .label(format!("{label} {:.3}", x))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 12, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((SANS, 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)
    }
}

/// Labelled series of (x, y) points, drawn as a scatter (`lines = false`) or as lines.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
    /// Its marker; by default the series' own: series `i` gets colour `i mod 10` and shape
    /// `i / 10` (see [`Marker`]).
    pub marker: Option<Marker>,
}

/// A series' marker: a colour of [`PALETTE`] and a shape (filled circle, triangle, cross,
/// filled square, ring; lines solid for even shapes, dashed for odd ones), each taken modulo
/// their number. Series given one colour per method and one shape per model say both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Index into [`PALETTE`].
    pub colour: usize,
    /// Shape index.
    pub shape: usize,
}

impl Marker {
    /// The default marker of series `i`.
    fn of_series(i: usize) -> Marker {
        Marker {
            colour: i % PALETTE.len(),
            shape: i / PALETTE.len(),
        }
    }
}

impl Series {
    /// Series `i`'s marker: its own, or the default.
    fn marker_at(&self, i: usize) -> Marker {
        self.marker.unwrap_or_else(|| Marker::of_series(i))
    }
}

/// A scatter or line plot of several labelled series.
pub struct Plot {
    /// Title.
    pub title: String,
    /// Axis descriptions.
    pub x: String,
    /// Axis descriptions.
    pub y: String,
    /// The series.
    pub series: Vec<Series>,
    /// Draw lines through the points (else markers only).
    pub lines: bool,
    /// Equal axis scales, for projections.
    pub square: bool,
}

/// Horizontal bars of labelled values in [0, 1], the first at the top, each bar's label and value
/// written beside it: a model's mean output distribution over the images of one class (the
/// paper's Fig. 5).
pub struct ClassBars {
    /// Title.
    pub title: String,
    /// (label, value), drawn top to bottom.
    pub bars: Vec<(String, f64)>,
    /// The bar drawn in the second colour (the class whose images were averaged), if shown.
    pub highlight: Option<usize>,
}

impl ClassBars {
    /// The bars of `best` (classes named by `names`, their index when missing), the best class
    /// highlighted.
    pub fn of_best(title: String, best: &BestClass, names: &[String]) -> Self {
        let name = |c: usize| names.get(c).cloned().unwrap_or_else(|| c.to_string());
        ClassBars {
            title,
            bars: best.top.iter().map(|&(c, p)| (name(c), p)).collect(),
            highlight: best.top.iter().position(|&(c, _)| c == best.class),
        }
    }
}

impl Figure for ClassBars {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let n = self.bars.len().max(1) as f64;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (SANS, 14))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(10)
            .build_cartesian_2d(0f64..1f64, 0f64..n)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("mean probability")
            .label_style((SANS, 12))
            .disable_y_axis()
            .disable_mesh()
            .draw()
            .map_err(err)?;
        for (i, (label, v)) in self.bars.iter().enumerate() {
            let top = n - i as f64;
            let colour = if self.highlight == Some(i) {
                PALETTE[1]
            } else {
                PALETTE[0]
            };
            chart
                .draw_series([Rectangle::new(
                    [(0.0, top - 0.85), (v.clamp(0.0, 1.0), top - 0.15)],
                    colour.mix(0.85).filled(),
                )])
                .map_err(err)?;
            // Beside the bar, or inside it when it reaches the right edge.
            let x = if *v < 0.6 { v + 0.01 } else { 0.01 };
            chart
                .draw_series([Text::new(
                    format!("{label} ({v:.2})"),
                    (x, top - 0.5),
                    TextStyle::from((SANS, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
                )])
                .map_err(err)?;
        }
        Ok(())
    }
}

/// Images in a grid, each with lines of text beside it (the paper's Fig. 6: mixed training
/// images with the labels they were taught). Meant for [`save_png`].
pub struct ImageGrid {
    /// Title over all cells.
    pub title: String,
    /// The cells.
    pub cells: Vec<ImageCell>,
    /// Cells per row.
    pub columns: usize,
}

/// One image of an [`ImageGrid`] and its text.
#[derive(Debug, Clone)]
pub struct ImageCell {
    /// RGB pixels, row-major, 3 bytes a pixel.
    pub pixels: Vec<u8>,
    /// Width and height.
    pub size: (u32, u32),
    /// Lines of text beside the image.
    pub lines: Vec<String>,
}

/// `pixels` (`w × h` RGB) resized to `tw × th` by nearest neighbour, so pixels stay sharp.
fn nearest(pixels: &[u8], (w, h): (u32, u32), (tw, th): (u32, u32)) -> Vec<u8> {
    let mut out = Vec::with_capacity((tw * th * 3) as usize);
    for y in 0..th {
        for x in 0..tw {
            let (sx, sy) = (x * w / tw, y * h / th);
            let at = ((sy * w + sx) * 3) as usize;
            out.extend_from_slice(&pixels[at..at + 3]);
        }
    }
    out
}

impl Figure for ImageGrid {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let body = root.titled(&self.title, (SANS, 16)).map_err(err)?;
        let columns = self.columns.max(1);
        let rows = self.cells.len().div_ceil(columns).max(1);
        let areas = body.split_evenly((rows, columns));
        for (cell, area) in self.cells.iter().zip(&areas) {
            let (pixels, (w, h), lines) = (&cell.pixels, &cell.size, &cell.lines);
            let (aw, ah) = area.dim_in_pixel();
            // The image takes the left half of its cell, the text the right.
            let f = ((aw / 2).saturating_sub(8) as f64 / *w as f64)
                .min(ah.saturating_sub(8) as f64 / *h as f64);
            let (tw, th) = (
                (*w as f64 * f).max(1.0) as u32,
                (*h as f64 * f).max(1.0) as u32,
            );
            let image: BitMapElement<_> = BitMapElement::with_owned_buffer(
                (4, 4),
                (tw, th),
                nearest(pixels, (*w, *h), (tw, th)),
            )
            .ok_or("image buffer smaller than its size")?;
            area.draw(&image).map_err(err)?;
            for (i, line) in lines.iter().enumerate() {
                area.draw(&Text::new(
                    line.clone(),
                    (tw as i32 + 12, 6 + 16 * i as i32),
                    (SANS, 13).into_font(),
                ))
                .map_err(err)?;
            }
        }
        Ok(())
    }
}

/// Figures in a grid of `columns` columns under one title, row by row.
pub struct Grid<F> {
    /// Title over all panels.
    pub title: String,
    /// The panels.
    pub panels: Vec<F>,
    /// Panels per row.
    pub columns: usize,
}

impl<F> Grid<F> {
    /// `panels` side by side, in one row.
    pub fn row(title: String, panels: Vec<F>) -> Self {
        let columns = panels.len();
        Grid {
            title,
            panels,
            columns,
        }
    }
}

impl<F: Figure> Figure for Grid<F> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let body = root.titled(&self.title, (SANS, 18)).map_err(err)?;
        let columns = self.columns.max(1);
        let rows = self.panels.len().div_ceil(columns).max(1);
        let areas = body.split_evenly((rows, columns));
        for (panel, area) in self.panels.iter().zip(&areas) {
            panel.draw(area)?;
        }
        Ok(())
    }

    fn height_for(&self, width: u32, height: u32) -> u32 {
        let columns = self.columns.max(1);
        let rows = self.panels.len().div_ceil(columns).max(1) as u32;
        let title = title_height(&self.title, 18);
        let panel = (height.saturating_sub(title) / rows).max(1);
        let needed = self
            .panels
            .iter()
            .map(|p| p.height_for(width / columns as u32, panel))
            .max()
            .unwrap_or(panel);
        height.max(title + rows * needed)
    }
}

/// Training curves, one panel each: accuracy (%), ECE (%) and NLL (nats) by epoch, measured on
/// the held-out split `split` (the series are the caller's: one model's, or one per report row;
/// `with_loss` when the last panel also holds the method's training loss).
pub fn curve_panels(
    title: String,
    split: &str,
    accuracy: Vec<Series>,
    ece: Vec<Series>,
    nll: Vec<Series>,
    with_loss: bool,
) -> Grid<Plot> {
    let plot = |what: &str, y: &str, series: Vec<Series>| Plot {
        title: format!("{what} by epoch"),
        x: "epoch".into(),
        y: y.into(),
        series,
        lines: true,
        square: false,
    };
    Grid::row(
        title,
        vec![
            plot("accuracy", "accuracy (%)", accuracy),
            plot(&format!("{split} ECE"), "ECE (%)", ece),
            if with_loss {
                plot(&format!("training loss and {split} NLL"), "nats", nll)
            } else {
                plot(&format!("{split} NLL"), "NLL (nats)", nll)
            },
        ],
    )
}

fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    (lo - pad)..(hi + pad)
}

/// Marker shapes: filled circle, triangle, cross, filled square, ring. With the ten colours,
/// 50 series have markers of their own.
pub const MARKER_SHAPES: usize = 5;

/// Draws marker `m` at `p`.
fn marker<DB: DrawingBackend, C: CoordTranslate>(
    area: &DrawingArea<DB, C>,
    m: Marker,
    p: C::From,
) -> std::result::Result<(), String>
where
    C::From: Clone,
{
    let colour = PALETTE[m.colour % PALETTE.len()];
    let style = colour.mix(0.85).filled();
    match m.shape % MARKER_SHAPES {
        0 => area.draw(&Circle::new(p, 3, style)),
        1 => area.draw(&TriangleMarker::new(p, 5, style)),
        2 => area.draw(&Cross::new(p, 4, colour.stroke_width(2))),
        3 => area.draw(&(EmptyElement::at(p) + Rectangle::new([(-3, -3), (3, 3)], style))),
        _ => area.draw(&Circle::new(p, 4, colour.stroke_width(2))),
    }
    .map_err(err)
}

/// A plot's margin, and the heights of the x axis' labels and widths of the y axis' (pixels).
const MARGIN: u32 = 12;
const X_LABELS: u32 = 40;
const Y_LABELS: u32 = 60;

/// The data ranges, about `x` and `y`'s centres and holding both, that a plotting area of
/// `inner` pixels (width, height) draws at one scale on both axes: a unit as long across as up.
fn equal_scales(
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    inner: (f64, f64),
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (w, h) = (inner.0.max(1.0), inner.1.max(1.0));
    let per_pixel = ((x.end - x.start) / w).max((y.end - y.start) / h);
    let about = |r: &std::ops::Range<f64>, pixels: f64| {
        let (centre, half) = ((r.start + r.end) / 2.0, per_pixel * pixels / 2.0);
        (centre - half)..(centre + half)
    };
    (about(&x, w), about(&y, h))
}

impl Figure for Plot {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        // The legend gets its own column on the right, so it never hides points.
        let body = root.titled(&self.title, (SANS, 16)).map_err(err)?;
        let (w, _) = body.dim_in_pixel();
        let legend_w = self.legend_width(w);
        let (plot_area, legend_area) = body.split_horizontally(w as i32 - legend_w as i32);
        let points = || self.series.iter().flat_map(|s| s.points.iter());
        let (mut xr, mut yr) = (range(points().map(|p| p.0)), range(points().map(|p| p.1)));
        if self.square {
            let (w, h) = plot_area.dim_in_pixel();
            let inner = (
                w as f64 - 2.0 * MARGIN as f64 - Y_LABELS as f64,
                h as f64 - 2.0 * MARGIN as f64 - X_LABELS as f64,
            );
            (xr, yr) = equal_scales(xr, yr, inner);
        }
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(MARGIN)
            .x_label_area_size(X_LABELS)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(xr, yr)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(self.x.as_str())
            .y_desc(self.y.as_str())
            .label_style((SANS, 13))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for (i, s) in self.series.iter().enumerate() {
            let m = s.marker_at(i);
            let colour = PALETTE[m.colour % PALETTE.len()];
            let finite: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            if self.lines {
                let dashed = m.shape % 2 == 1;
                if dashed {
                    chart
                        .draw_series(DashedLineSeries::new(
                            finite.clone(),
                            6,
                            4,
                            colour.stroke_width(2),
                        ))
                        .map_err(err)?;
                } else {
                    chart
                        .draw_series(LineSeries::new(finite.clone(), colour.stroke_width(2)))
                        .map_err(err)?;
                }
            }
            let area = chart.plotting_area();
            for p in finite {
                marker(area, m, p)?;
            }
        }
        let mut y = LEGEND_TOP as i32;
        for (i, lines) in self.legend(legend_w).iter().enumerate() {
            marker(&legend_area, self.series[i].marker_at(i), (10, y))?;
            for line in lines {
                legend_area
                    .draw(&Text::new(
                        line.clone(),
                        (LEGEND_TEXT as i32, y - 7),
                        (SANS, 12),
                    ))
                    .map_err(err)?;
                y += LEGEND_LINE as i32;
            }
            y += LEGEND_GAP as i32;
        }
        Ok(())
    }

    fn height_for(&self, width: u32, height: u32) -> u32 {
        let legend = self.legend(self.legend_width(width));
        let lines: u32 = legend.iter().map(|l| l.len() as u32).sum();
        let column = LEGEND_TOP + lines * LEGEND_LINE + legend.len() as u32 * LEGEND_GAP;
        height.max(title_height(&self.title, 16) + column)
    }
}

/// A legend's layout (pixels): the first entry's centre below the top of the legend column,
/// a text line's height, the gap between entries, and where the text starts.
const LEGEND_TOP: u32 = 20;
const LEGEND_LINE: u32 = 15;
const LEGEND_GAP: u32 = 3;
const LEGEND_TEXT: u32 = 22;

/// The height that plotters' `titled` takes for `title` in `size`-pixel text: the text's and
/// a padding of half of it (at most 5 pixels) above and below.
fn title_height(title: &str, size: u32) -> u32 {
    register_font();
    let h = (SANS, size as f64)
        .into_font()
        .box_size(title)
        .map_or(size + 4, |(_, h)| h);
    h + 2 * (h / 2).min(5)
}

impl Plot {
    /// The width of the legend column at `width` pixels: none for one unlabelled series, else
    /// a third of the figure, at most 280 pixels. The legend has its own column on the right,
    /// so it never hides points.
    fn legend_width(&self, width: u32) -> u32 {
        let labelled = self.series.len() > 1 || self.series.iter().any(|s| !s.label.is_empty());
        if labelled {
            (width / 3).min(280)
        } else {
            0
        }
    }

    /// Each series' legend text, broken into lines that fit a legend column `width` wide.
    fn legend(&self, width: u32) -> Vec<Vec<String>> {
        if width == 0 {
            return Vec::new();
        }
        let room = width.saturating_sub(LEGEND_TEXT + 4).max(40);
        self.series.iter().map(|s| wrap(&s.label, room)).collect()
    }
}

/// The width of `text` in the legend's font (12-pixel DejaVu Sans), pixels.
fn text_width(text: &str) -> u32 {
    register_font();
    (SANS, 12)
        .into_font()
        .box_size(text)
        .map_or(7 * text.chars().count() as u32, |(w, _)| w)
}

/// `text` broken at spaces into lines at most `width` pixels wide; a word wider than that is
/// cut where it reaches the width. An empty text is one empty line.
fn wrap(text: &str, width: u32) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let joined = if line.is_empty() {
            word.to_string()
        } else {
            format!("{line} {word}")
        };
        if text_width(&joined) <= width || line.is_empty() && word.is_empty() {
            line = joined;
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        // The word alone, cut into pieces that fit.
        for c in word.chars() {
            line.push(c);
            if text_width(&line) > width && line.chars().count() > 1 {
                let last = line.pop().expect("two characters");
                lines.push(std::mem::replace(&mut line, last.to_string()));
            }
        }
    }
    lines.push(line);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal scales: as many units per pixel across as up, both ranges kept inside.
    #[test]
    fn equal_scales_give_a_unit_one_length_on_both_axes() {
        // 4 units wide, 1 high, on 300 × 100 pixels: 4/300 per pixel, so y spans 100·4/300.
        let (x, y) = equal_scales(0.0..4.0, 10.0..11.0, (300.0, 100.0));
        assert!((x.end - x.start - 4.0).abs() < 1e-12);
        assert!((y.end - y.start - 4.0 / 3.0).abs() < 1e-12);
        assert!((y.start + y.end - 21.0).abs() < 1e-12, "centred: {y:?}");
        // 1 wide, 4 high on the same pixels: 4/100 per pixel, x spans 12.
        let (x, y) = equal_scales(0.0..1.0, 0.0..4.0, (300.0, 100.0));
        assert!((x.end - x.start - 12.0).abs() < 1e-12 && (y.end - y.start - 4.0).abs() < 1e-12);
        assert!(x.start <= 0.0 && x.end >= 1.0);
    }

    fn bins() -> Vec<Bin> {
        (0..10)
            .map(|i| Bin {
                lo: i as f64 / 10.0,
                hi: (i + 1) as f64 / 10.0,
                count: i * 3,
                accuracy: (i as f64 / 10.0 - 0.05).max(0.0),
                confidence: i as f64 / 10.0 + 0.05,
            })
            .collect()
    }

    /// Width and height attributes of an SVG's root element.
    fn svg_size(svg: &str) -> (u32, u32) {
        let root = &svg[svg.find("<svg").expect("an <svg> element")..];
        let attr = |name: &str| -> u32 {
            let at = root.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
            root[at..].split('"').next().unwrap().parse().unwrap()
        };
        (attr("width"), attr("height"))
    }

    #[test]
    fn image_grids_show_the_pixels_sharp_and_scaled() {
        // A 2 × 2 image: red, green / blue, white; scaled ×2 by nearest neighbour.
        let px = vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
        let big = nearest(&px, (2, 2), (4, 4));
        let at = |x: usize, y: usize| &big[(y * 4 + x) * 3..(y * 4 + x) * 3 + 3];
        assert_eq!(
            (at(0, 0), at(1, 1), at(2, 0), at(3, 1)),
            (&px[0..3], &px[0..3], &px[3..6], &px[3..6])
        );
        assert_eq!((at(0, 3), at(3, 3)), (&px[6..9], &px[9..12]));
        let dir = tempfile::tempdir().unwrap();
        let grid = ImageGrid {
            title: "examples".into(),
            cells: vec![
                ImageCell {
                    pixels: px.clone(),
                    size: (2, 2),
                    lines: vec!["label".into(), "  a 1.00".into()],
                };
                3
            ],
            columns: 2,
        };
        let files = save_png(&grid, dir.path(), "grid", (400, 300)).unwrap();
        assert_eq!(files, ["grid.png"]);
        let png = image::open(dir.path().join("grid.png")).unwrap().to_rgb8();
        assert_eq!(png.dimensions(), (400, 300));
        // Each cell's image fills the left half of its 200 × ~140 cell: pure red, green and blue
        // blocks of many pixels each.
        for colour in [[255, 0, 0], [0, 255, 0], [0, 0, 255]] {
            let n = png.pixels().filter(|p| p.0 == colour).count();
            assert!(n > 3 * 40 * 40, "{colour:?}: {n} pixels");
        }
    }

    #[test]
    fn figures_are_valid_png_and_svg_of_the_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let b = bins();
        let figs: Vec<Vec<String>> = vec![
            save(
                &Reliability {
                    title: "model — accuracy 50.0%, ECE 5.00%".into(),
                    bins: &b,
                },
                dir.path(),
                "reliability",
                (640, 480),
            )
            .unwrap(),
            save(
                &ConfidenceHistogram {
                    title: "confidence".into(),
                    bins: &b,
                    accuracy: 0.5,
                },
                dir.path(),
                "histogram",
                (500, 400),
            )
            .unwrap(),
            save(
                &Plot {
                    title: "scatter".into(),
                    x: "accuracy".into(),
                    y: "ECE".into(),
                    series: vec![
                        Series {
                            label: "a".into(),
                            points: vec![(0.5, 0.1), (0.6, 0.05), (f64::NAN, 1.0)],
                            marker: None,
                        },
                        Series {
                            label: "b".into(),
                            points: vec![(0.7, 0.02)],
                            marker: None,
                        },
                    ],
                    lines: false,
                    square: true,
                },
                dir.path(),
                "scatter",
                (300, 300),
            )
            .unwrap(),
        ];
        for (files, size) in figs.iter().zip([(640, 480), (500, 400), (300, 300)]) {
            assert_eq!(files.len(), 2);
            let png = image::open(dir.path().join(&files[0])).unwrap();
            assert_eq!((png.width(), png.height()), size);
            // Something other than the white background was drawn.
            let rgb = png.to_rgb8();
            let inked = rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count();
            assert!(inked > 1000, "{}: {inked} drawn pixels", files[0]);
            let svg = std::fs::read_to_string(dir.path().join(&files[1])).unwrap();
            assert_eq!(svg_size(&svg), size);
            assert!(svg.trim_end().ends_with("</svg>"), "{}", files[1]);
            assert!(svg.contains("<text"), "{}: no text", files[1]);
        }
    }

    /// Lines are broken at spaces, each within the width, the words kept in order; a word
    /// wider than a line is cut into pieces that fit; a short label is one line.
    #[test]
    fn legend_labels_wrap_within_the_width() {
        let label = "On-LDL (cutmix, MCDO-T, MCDO-S) (labels.teacher.model=resnet56) / resnet110";
        assert!(text_width("(labels.teacher.model=resnet56)") < 220);
        let lines = wrap(label, 220);
        assert!(lines.len() >= 2, "{lines:?}");
        assert!(lines.iter().all(|l| text_width(l) <= 220), "{lines:?}");
        assert_eq!(lines.join(" "), label);
        assert_eq!(wrap("KD / resnet8", 150), ["KD / resnet8"]);
        let word = "x".repeat(80);
        let cut = wrap(&word, 100);
        assert!(
            cut.len() > 1 && cut.iter().all(|l| text_width(l) <= 100),
            "{cut:?}"
        );
        assert_eq!(cut.concat(), word);
        assert_eq!(wrap("", 100), [""]);
    }

    /// A legend longer than the figure makes the figure taller, so that every entry is drawn
    /// inside it; every word of every label is in the SVG's text, none beyond its height.
    #[test]
    fn a_long_legend_grows_the_figure_and_every_entry_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let series: Vec<Series> = (0..40)
            .map(|i| Series {
                label: format!("Method number {i} (kd_tau=4, mix=cutmix, label_smoothing=0.1)"),
                points: vec![(i as f64, (i * i) as f64)],
                marker: None,
            })
            .collect();
        let plot = Plot {
            title: "many rows".into(),
            x: "x".into(),
            y: "y".into(),
            series,
            lines: false,
            square: false,
        };
        let files = save(&plot, dir.path(), "many", (760, 560)).unwrap();
        let png = image::open(dir.path().join(&files[0])).unwrap();
        assert_eq!(png.width(), 760);
        // 40 entries of at least two lines each (the legend column is 253 pixels wide).
        assert!(
            png.height() > 40 * (2 * LEGEND_LINE + LEGEND_GAP),
            "{}",
            png.height()
        );
        let svg = std::fs::read_to_string(dir.path().join(&files[1])).unwrap();
        let (_, h) = svg_size(&svg);
        assert_eq!(h, png.height());
        let texts: Vec<(f64, &str)> = svg
            .split("<text")
            .skip(1)
            .map(|t| {
                let y = t.split(" y=\"").nth(1).unwrap().split('"').next().unwrap();
                let body = t.split('>').nth(1).unwrap().split("</text").next().unwrap();
                (y.parse().unwrap(), body)
            })
            .collect();
        for i in [0, 17, 39] {
            let entry: Vec<&str> = texts
                .iter()
                .filter(|(_, t)| t.contains(&format!("number {i} ")) || t.ends_with("cutmix,"))
                .map(|(_, t)| *t)
                .collect();
            assert!(!entry.is_empty(), "entry {i} not drawn");
        }
        let words = svg.matches("label_smoothing=0.1)").count();
        assert_eq!(words, 40, "every label's last word is drawn");
        let lowest = texts.iter().map(|(y, _)| *y).fold(0.0, f64::max);
        assert!(
            lowest < h as f64,
            "text at y = {lowest}, below the figure's {h} pixels"
        );
    }
}
