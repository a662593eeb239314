//! Repeated measurements of one figure, reported as their median and spread.

use serde_json::{Value, json};

/// One figure measured once per round of a scenario.
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples(Vec<f64>);

impl Samples {
    pub(crate) fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    /// Pushes `values[i]` onto `samples[i]`, for each `i`.
    pub(crate) fn push_all<const N: usize>(samples: [&mut Samples; N], values: [f64; N]) {
        for (s, v) in samples.into_iter().zip(values) {
            s.push(v);
        }
    }

    /// Its values, in the order pushed.
    pub(crate) fn iter(&self) -> impl Iterator<Item = f64> + '_ {
        self.0.iter().copied()
    }

    /// How many rounds it holds.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Every value multiplied by `factor` (a change of unit).
    pub(crate) fn scaled(&self, factor: f64) -> Samples {
        self.0.iter().map(|v| v * factor).collect()
    }

    /// The median (the mean of the middle two for an even count); NaN when empty.
    pub(crate) fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub(crate) fn min(&self) -> f64 {
        self.0.iter().copied().reduce(f64::min).unwrap_or(f64::NAN)
    }

    pub(crate) fn max(&self) -> f64 {
        self.0.iter().copied().reduce(f64::max).unwrap_or(f64::NAN)
    }

    /// "min-max" with `digits` decimals.
    pub(crate) fn spread(&self, digits: usize) -> String {
        format!("{:.*}-{:.*}", digits, self.min(), digits, self.max())
    }

    /// `{"median", "min", "max", "rounds": [...]}`.
    pub(crate) fn to_json(&self) -> Value {
        json!({"median": self.median(), "min": self.min(), "max": self.max(), "rounds": self.0})
    }
}

impl FromIterator<f64> for Samples {
    fn from_iter<I: IntoIterator<Item = f64>>(iter: I) -> Self {
        Samples(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread_do_not_depend_on_order() {
        let s: Samples = [9.0, 1.0, 5.0].into_iter().collect();
        assert_eq!(s.median(), 5.0);
        assert_eq!((s.min(), s.max()), (1.0, 9.0));
        assert_eq!(s.spread(1), "1.0-9.0");
        let even: Samples = [4.0, 1.0, 3.0, 10.0].into_iter().collect();
        assert_eq!(even.median(), 3.5);
    }

    #[test]
    fn json_keeps_every_round_in_order() {
        let s: Samples = [2.0, 1.0].into_iter().collect();
        assert_eq!(
            s.to_json(),
            json!({"median": 1.5, "min": 1.0, "max": 2.0, "rounds": [2.0, 1.0]})
        );
    }

    #[test]
    fn empty_is_not_a_number() {
        let s = Samples::default();
        assert!(s.median().is_nan() && s.min().is_nan() && s.max().is_nan());
    }
}
