//! TLS, as every HTTP client and server of the crate uses it: rustls with the ring provider.
//! Below every stage, so that the API client and the callback listener share one setup.

/// Sets up rustls' crypto provider (ring) once per process; reqwest needs it before any client,
/// and a rustls server before its config is built.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
