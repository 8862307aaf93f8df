//! Every example manifest shipped in `fixtures/` must load and validate: they are documentation, and
//! documentation that does not apply is worse than none.

use berth_api_types::manifest::load_paths;
use berth_api_types::typed::decode_doc;
use std::path::PathBuf;

#[test]
fn shipped_fixtures_are_valid() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let docs = load_paths(&[dir]).unwrap_or_else(|errs| panic!("{}", lines(&errs)));
    assert!(
        docs.len() >= 3,
        "expected the demo and example manifests, found {}",
        docs.len()
    );
    for doc in &docs {
        if let Err(errs) = decode_doc(doc) {
            panic!("{}", lines(&errs));
        }
    }
}

fn lines(errs: &[berth_api_types::manifest::ManifestError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
