//! Generates the C header of the ABI into OUT_DIR (the committed copy in
//! include/ivcom.h is checked against it by the `header_is_current` test).

fn main() {
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("out dir")).join("ivcom.h");
    let cfg_path = std::path::Path::new(&crate_dir).join("../cbindgen.toml");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed={}", cfg_path.display());
    let cfg = cbindgen::Config::from_file(&cfg_path).expect("cbindgen.toml");
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(cfg)
        .generate()
        .expect("generate the C header")
        .write_to_file(&out);
}
