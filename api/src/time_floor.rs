//! The image's time floor: a moment the real time is known to be past, written by the
//! builder into the root's `/etc/os-release` and read by basalt-init, which never sets
//! the clock below it (an NTP answer that would is refused).
//!
//! The image is reproducible, so the floor cannot be the wall-clock time of the build:
//! it is `SOURCE_DATE_EPOCH` when the builder's caller sets it (the reproducible-builds
//! convention for "the time of the build", fixed by whoever fixes the build), and never
//! less than [`SOURCE_FLOOR`], the time this source was written. The root is covered by
//! dm-verity, so the line cannot be changed without breaking the boot; basalt-init also
//! applies [`SOURCE_FLOOR`] itself when the line is missing (an image built before it).
//!
//! ```text
//! BASALT_TIME_FLOOR=1793491200
//! ```

/// The os-release key: Unix seconds, decimal.
pub const OS_RELEASE_KEY: &str = "BASALT_TIME_FLOOR";
/// Where the builder writes it, relative to the root.
pub const OS_RELEASE_PATH: &str = "etc/os-release";
/// 2026-11-01T00:00:00Z: no build of this source, and so no boot of its image, happens
/// before. Move it forward now and then; never past the date of the commit that does.
pub const SOURCE_FLOOR: u64 = 1_793_491_200;

/// The os-release line for `floor`.
pub fn os_release_line(floor: u64) -> String {
    format!("{OS_RELEASE_KEY}={floor}\n")
}

/// The floor in an os-release text: the value of [`OS_RELEASE_KEY`] (quotes allowed, as
/// os-release allows them), or `None` when the key is missing or not a number.
pub fn from_os_release(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line
            .trim()
            .strip_prefix(OS_RELEASE_KEY)?
            .strip_prefix('=')?;
        value.trim_matches(|c| c == '"' || c == '\'').parse().ok()
    })
}

/// The floor to build with: `SOURCE_DATE_EPOCH` when given, but at least
/// [`SOURCE_FLOOR`]. A value that is not a whole number of seconds is an error (the
/// reproducible-builds specification says so), never silently ignored.
pub fn for_build(source_date_epoch: Option<&str>) -> Result<u64, TimeFloorError> {
    let given = match source_date_epoch {
        None => 0,
        Some(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| TimeFloorError::SourceDateEpoch(text.to_owned()))?,
    };
    Ok(given.max(SOURCE_FLOOR))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeFloorError {
    #[error("SOURCE_DATE_EPOCH={0:?} is not a number of seconds since 1970")]
    SourceDateEpoch(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reads_back_among_other_os_release_lines() {
        let text = format!(
            "NAME=basalt\nPRETTY_NAME=\"basalt 0.1.0\"\n{}BASALT_K3S=v1\n",
            os_release_line(1_800_000_000)
        );
        assert_eq!(from_os_release(&text), Some(1_800_000_000));
        assert_eq!(
            from_os_release("BASALT_TIME_FLOOR=\"1800000001\"\n"),
            Some(1_800_000_001)
        );
        assert_eq!(from_os_release("NAME=basalt\n"), None);
        assert_eq!(from_os_release("BASALT_TIME_FLOOR=soon\n"), None);
        // A key that merely starts with ours is another key.
        assert_eq!(from_os_release("BASALT_TIME_FLOOR_X=5\n"), None);
    }

    #[test]
    fn the_build_floor_is_source_date_epoch_but_never_below_the_source() {
        assert_eq!(for_build(None), Ok(SOURCE_FLOOR));
        assert_eq!(for_build(Some("1900000000")), Ok(1_900_000_000));
        assert_eq!(for_build(Some("0")), Ok(SOURCE_FLOOR));
        assert_eq!(
            for_build(Some("yesterday")),
            Err(TimeFloorError::SourceDateEpoch("yesterday".into()))
        );
        assert!(for_build(Some("-1")).is_err());
    }
}
