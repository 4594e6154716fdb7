//! The API reference shipped in the repository (`docs/API.md`) is the OpenAPI document a real
//! `kiln serve` serves, rendered as Markdown: they agree, or this test says how to regenerate
//! the file (`KILN_BLESS=1` rewrites it).

mod common;

use common::server::Server;

#[test]
fn docs_api_md_is_the_served_document() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let doc = s.block_on(s.client().openapi()).unwrap();
    let rendered = api::reference::markdown(&doc);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/API.md");
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &rendered).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == rendered,
        "{} does not match the served OpenAPI document: regenerate it with \
         `KILN_BLESS=1 cargo test --release --test api_reference` and commit it",
        path.display()
    );
    for route in api::routes() {
        let heading = format!("`{} {}`", route.method, route.path);
        assert!(
            shipped.contains(&heading),
            "{heading} is not in docs/API.md"
        );
    }
}
