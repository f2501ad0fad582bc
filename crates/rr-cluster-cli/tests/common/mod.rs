//! What the CLI's test binaries share.

/// A test cannot run for want of `what` (a tool, or what the system must offer):
/// prints `SKIPPED: what` so the caller can return, or, with `RR_REQUIRE_TOOLS=1` (CI
/// sets it), fails the test: a missing tool must not pass silently.
pub(crate) fn missing_tool(what: &str) {
    assert!(
        std::env::var("RR_REQUIRE_TOOLS").as_deref() != Ok("1"),
        "{what} (RR_REQUIRE_TOOLS=1: a test may not skip for a missing tool)"
    );
    eprintln!("SKIPPED: {what}");
}
