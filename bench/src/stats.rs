//! Median and range of repeated measurements: what the benchmarks print, since a mean is
//! dragged by the one run that met a busy machine.

/// Median, minimum and maximum of some samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` for no samples. NaNs are dropped.
    pub fn of(samples: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = samples.into_iter().filter(|x| !x.is_nan()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (median, min, max)
    type Want = Option<(f64, f64, f64)>;

    #[test]
    fn median_min_max() {
        let cases: &[(&[f64], Want)] = &[
            (&[], None),
            (&[2.0], Some((2.0, 2.0, 2.0))),
            (&[3.0, 1.0, 2.0], Some((2.0, 1.0, 3.0))),
            (&[4.0, 1.0, 3.0, 2.0], Some((2.5, 1.0, 4.0))),
            (&[f64::NAN, 5.0], Some((5.0, 5.0, 5.0))),
        ];
        for (samples, want) in cases {
            let got = Spread::of(samples.iter().copied()).map(|s| (s.median, s.min, s.max));
            assert_eq!(got, *want, "{samples:?}");
        }
    }
}
