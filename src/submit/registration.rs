//! The account's callback registration: ours is `callbacks.public_url` for
//! `callbacks.service_name`, with the callback credentials.

use super::{ApiClient, ApiError};
use crate::config::Config;

/// Registers `callbacks.public_url` for `callbacks.service_name`, with the callback credentials.
pub async fn register_ours(client: &ApiClient, config: &Config) -> Result<(), ApiError> {
    let c = &config.callbacks;
    client
        .register_callback(
            &config.account_name,
            &c.service_name,
            &c.public_url,
            c.username.as_ref(),
            c.password.as_ref(),
        )
        .await?;
    Ok(())
}

/// Lists the account's callbacks; registers ours if absent; warns when another URL is registered.
pub async fn ensure_registered(client: &ApiClient, config: &Config) -> Result<(), ApiError> {
    let c = &config.callbacks;
    let registered = client.list_callbacks(&config.account_name).await?;
    match registered.iter().find(|r| r.service_name == c.service_name) {
        Some(r) if r.url == c.public_url => Ok(()),
        Some(r) => {
            tracing::warn!(
                registered = r.url,
                configured = c.public_url,
                "the account's {} callback goes to another URL than callbacks.public_url; \
                 run `tsusage callbacks register` to change it",
                c.service_name
            );
            Ok(())
        }
        None => {
            tracing::info!(
                url = c.public_url,
                service = c.service_name,
                "registering the callback URL"
            );
            register_ours(client, config).await
        }
    }
}
