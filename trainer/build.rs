//! Embeds libtorch's directory as an rpath so `pleura-trainer` runs without
//! LD_LIBRARY_PATH (libtorch comes from a PyPI wheel outside the system paths).
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
