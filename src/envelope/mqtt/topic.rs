//! Topic names and filters (MQTT 3.1.1 and 5.0, section 4.7).

/// The filter a subscription matches by: a shared subscription's
/// (`$share/group/filter`) is the part after its group.
pub fn matching_part(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
        None => filter,
    }
}

/// Whether `filter` is a valid topic filter: not empty, `#` only as a
/// whole last level, `+` only as a whole level; a shared one names a
/// group without wildcards and a filter.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let inner = if let Some(rest) = filter.strip_prefix("$share/") {
        let Some((group, f)) = rest.split_once('/') else {
            return false;
        };
        if group.is_empty() || group.contains(['+', '#']) {
            return false;
        }
        f
    } else {
        filter
    };
    if inner.is_empty() {
        return false;
    }
    let levels: Vec<&str> = inner.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` is a valid topic name for a PUBLISH (no wildcards;
/// empty is allowed only with a 5.0 topic alias, checked by the caller).
pub fn valid_topic(topic: &[u8]) -> bool {
    !topic.iter().any(|&b| b == b'+' || b == b'#' || b == 0)
}

/// Whether `topic` matches `filter` (the matching part of a shared one).
/// Wildcards at the first level do not match a topic starting with `$`.
pub fn matches(topic: &str, filter: &str) -> bool {
    let filter = matching_part(filter);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            level => {
                if t.next() != Some(level) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_as_the_protocol_says() {
        for ok in [
            "a",
            "a/b",
            "+",
            "#",
            "a/+/c",
            "a/#",
            "+/+",
            "/",
            "$share/g/a/#",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in [
            "",
            "a/#/b",
            "a+",
            "a/b#",
            "#/a",
            "$share/g",
            "$share//a",
            "$share/g+/a",
        ] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn topics_match_as_the_protocol_says() {
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(matches("a/b", "$share/g/a/+"));
        assert!(!matches("a/b/c", "a/+"));
        assert!(!matches("a", "a/+"));
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
        assert!(matches("/a", "+/a"));
    }
}
