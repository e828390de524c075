//! The AWS KMS key provider: the volume key is born inside KMS (GenerateDataKey, 64 bytes) and
//! stored only as the ciphertext blob KMS returned, bound to an encryption context that names
//! the volume. Unlocking is one Decrypt call at open; nothing is kept afterwards, so serving
//! never depends on KMS once the volume is open.
//!
//! - Configuration: the default AWS chain of `aws-config` (env, profile, SSO, IMDS, web
//!   identity). The region comes from the key ARN when the key is given as one (a slot always
//!   records the ARN KMS returned), otherwise from that chain. The endpoint can be overridden
//!   with `--kms-endpoint`; `aws-config` also honours `AWS_ENDPOINT_URL_KMS` and
//!   `AWS_ENDPOINT_URL` (and `endpoint_url` in a profile).
//! - Retries: the SDK's own retry layer is disabled so that one deadline (`--kms-timeout`)
//!   bounds each KMS operation, retries included. Throttling, KMS internal errors and 5xx,
//!   timeouts and connection failures are retried with exponential backoff and full jitter
//!   ([`retry`]); anything else (access denied, disabled key, wrong context, ...) fails at once.
//!   A failed unwrap is never cached: every open asks KMS again.
//! - Errors: [`KmsError`], one variant per thing an operator can act on, with the action in
//!   the message.
//! - Plaintext: the SDK hands the data key over as a `Blob`; its bytes are copied into a
//!   locked [`VolumeKey`] and the `Vec` is zeroized at once. Copies made inside the SDK's HTTP
//!   and JSON layers (the base64 response body) are outside this crate's reach. Encrypt (used
//!   only to add a KMS slot to an existing volume) has to hand the SDK a plaintext copy it
//!   cannot zeroize either; GenerateDataKey and ReEncrypt do not.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::Client;
use zeroize::Zeroize;

use super::{BoxFuture, EncryptionContext, KeyError, KeyProvider, Wrapped};
use crate::crypto::VolumeKey;
use crate::header::KeySlot;

/// Provider name stored in the header's slots.
pub const KIND: &str = "aws-kms";

/// Default total time for one KMS operation, retries included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An attempt is not started with less than this left before the deadline: it could not
/// complete a TLS handshake, let alone a KMS call.
const MIN_ATTEMPT: Duration = Duration::from_millis(50);

/// How nbdcrypt talks to KMS: the deadline and an optional endpoint override.
#[derive(Debug, Clone)]
pub struct KmsOptions {
    /// Total time allowed for one KMS operation, retries included.
    pub timeout: Duration,
    /// Endpoint URL (otherwise `AWS_ENDPOINT_URL_KMS`, `AWS_ENDPOINT_URL`, or the regional
    /// endpoint).
    pub endpoint: Option<String>,
}

impl Default for KmsOptions {
    fn default() -> Self {
        KmsOptions { timeout: DEFAULT_TIMEOUT, endpoint: None }
    }
}

/// Exponential backoff with full jitter within a deadline: before retry `n` (from 1) the
/// caller sleeps a uniformly random time in `[0, min(cap, base * 2^(n-1))]`; each attempt
/// gets at most `attempt_timeout`, and nothing is attempted past `deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub deadline: Duration,
    pub attempt_timeout: Duration,
    pub base: Duration,
    pub cap: Duration,
}

impl RetryPolicy {
    /// The policy for a total `deadline`. One attempt gets a third of it (between 1 s and
    /// 10 s, never more than the deadline), so a single hung connection leaves time for more.
    pub fn for_deadline(deadline: Duration) -> Self {
        let attempt_timeout = (deadline / 3).clamp(Duration::from_secs(1), Duration::from_secs(10)).min(deadline);
        RetryPolicy { deadline, attempt_timeout, base: Duration::from_millis(100), cap: Duration::from_secs(5) }
    }

    /// The upper bound of the pause before retry `n` (from 1).
    pub fn ceiling(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1).min(30)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// A KMS failure, typed by what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// IAM or the key policy does not allow the call (or, on AWS, the key does not exist in
    /// an account the caller can see).
    #[error(
        "access denied: {op} on {key} ({message}); allow {op} on this key for this role (IAM policy and key \
         policy), with its condition on kms:EncryptionContext:nbdcrypt:volume matching the volume"
    )]
    AccessDenied { op: &'static str, key: String, message: String },
    /// The key is disabled.
    #[error(
        "KMS key {key} is disabled ({message}); enable it (aws kms enable-key --key-id {key}) or unlock \
         through another key slot"
    )]
    Disabled { key: String, message: String },
    /// The key is scheduled for deletion.
    #[error(
        "KMS key {key} is pending deletion ({message}); cancel the deletion (aws kms cancel-key-deletion \
         --key-id {key}) and enable the key, then rewrap this slot to another key"
    )]
    PendingDeletion { key: String, message: String },
    /// Another key state that forbids the call (pending import, unavailable custom key store).
    #[error("KMS key {key} cannot be used in its current state ({message}); see aws kms describe-key --key-id {key}")]
    InvalidState { key: String, message: String },
    /// KMS could not authenticate the ciphertext: the encryption context differs from the one
    /// it was wrapped under, or the blob was altered.
    #[error(
        "KMS refused the wrapped key of {key} ({message}): the slot's encryption context is not the one it \
         was wrapped with, or the wrapped key was altered"
    )]
    WrongContext { key: String, message: String },
    /// The ciphertext was produced under another KMS key.
    #[error("the wrapped key was not made by KMS key {key} ({message}); the slot's key id was altered")]
    WrongKey { key: String, message: String },
    /// No such key (or alias) in that account and region.
    #[error("KMS key {key} was not found ({message}); check the key id, its region and account, and the endpoint")]
    NotFound { key: String, message: String },
    /// The key exists but cannot encrypt/decrypt (an asymmetric or HMAC key).
    #[error("KMS key {key} cannot be used for {op} ({message}); nbdcrypt needs a symmetric ENCRYPT_DECRYPT key")]
    KeyUsage { op: &'static str, key: String, message: String },
    /// KMS throttled the call (retried until the deadline).
    #[error("KMS throttled {op} ({message})")]
    Throttled { op: &'static str, message: String },
    /// A KMS-side failure that may pass: internal error, dependency timeout, 5xx.
    #[error("KMS is unavailable for {op} ({message})")]
    Unavailable { op: &'static str, message: String },
    /// No connection to the endpoint (refused, reset, DNS, TLS).
    #[error("cannot reach KMS for {op} at {endpoint}: {detail}")]
    Unreachable { op: &'static str, endpoint: String, detail: String },
    /// One attempt took longer than its share of the deadline.
    #[error("KMS did not answer {op} at {endpoint} within {ms} ms")]
    Timeout { op: &'static str, endpoint: String, ms: u64 },
    /// The credential chain found nothing.
    #[error(
        "no AWS credentials found ({detail}); on EC2 attach an instance profile, elsewhere set AWS_PROFILE \
         or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )]
    NoCredentials { detail: String },
    /// A credential provider failed in a way that may pass (IMDS or STS timed out).
    #[error("AWS credentials could not be loaded ({detail})")]
    CredentialsUnavailable { detail: String },
    /// KMS rejected the credentials themselves.
    #[error(
        "KMS rejected the AWS credentials for {op} ({message}); check that they are current, the session \
         token matches, and the clock is right"
    )]
    BadCredentials { op: &'static str, message: String },
    /// No region: neither in the key (not an ARN) nor in the configuration.
    #[error(
        "no AWS region for KMS key {key}: give the key as an ARN, or set AWS_REGION (on EC2 the instance's \
         region is found by itself)"
    )]
    NoRegion { key: String },
    /// The request could not be built or sent for a reason that will not pass (bad endpoint URL).
    #[error("the KMS request {op} could not be made: {detail}")]
    Request { op: &'static str, detail: String },
    /// The response could not be read (truncated, not JSON); retried.
    #[error("KMS answered {op} with an unreadable response ({detail})")]
    BadResponse { op: &'static str, detail: String },
    /// The response parsed but lacks what the API promises.
    #[error("KMS answered {op} with {what}")]
    Protocol { op: &'static str, what: &'static str },
    /// Any other KMS error, by its code.
    #[error("KMS refused {op} on {key} ({message})")]
    Service { op: &'static str, key: String, message: String },
    /// Transient failures until the deadline.
    #[error("{op} on {key} did not succeed within {deadline_ms} ms ({attempts} attempts)")]
    GaveUp {
        op: &'static str,
        key: String,
        attempts: u32,
        deadline_ms: u64,
        #[source]
        last: Box<KmsError>,
    },
}

impl KmsError {
    /// A short, bounded label for metrics (`nbdcrypt_kms_errors_total{code}`).
    pub fn metric_code(&self) -> &'static str {
        match self {
            KmsError::AccessDenied { .. } => "access_denied",
            KmsError::Disabled { .. } => "disabled",
            KmsError::PendingDeletion { .. } => "pending_deletion",
            KmsError::InvalidState { .. } => "invalid_state",
            KmsError::WrongContext { .. } => "wrong_context",
            KmsError::WrongKey { .. } => "wrong_key",
            KmsError::NotFound { .. } => "not_found",
            KmsError::KeyUsage { .. } => "key_usage",
            KmsError::Throttled { .. } => "throttled",
            KmsError::Unavailable { .. } => "unavailable",
            KmsError::Unreachable { .. } => "unreachable",
            KmsError::Timeout { .. } => "timeout",
            KmsError::NoCredentials { .. } => "no_credentials",
            KmsError::CredentialsUnavailable { .. } => "credentials_unavailable",
            KmsError::BadCredentials { .. } => "bad_credentials",
            KmsError::NoRegion { .. } => "no_region",
            KmsError::Request { .. } => "request",
            KmsError::BadResponse { .. } => "bad_response",
            KmsError::Protocol { .. } => "protocol",
            KmsError::Service { .. } => "service",
            KmsError::GaveUp { .. } => "gave_up",
        }
    }

    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            KmsError::Throttled { .. }
            | KmsError::Unavailable { .. }
            | KmsError::Unreachable { .. }
            | KmsError::Timeout { .. }
            | KmsError::CredentialsUnavailable { .. }
            | KmsError::BadResponse { .. } => true,
            KmsError::AccessDenied { .. }
            | KmsError::Disabled { .. }
            | KmsError::PendingDeletion { .. }
            | KmsError::InvalidState { .. }
            | KmsError::WrongContext { .. }
            | KmsError::WrongKey { .. }
            | KmsError::NotFound { .. }
            | KmsError::KeyUsage { .. }
            | KmsError::NoCredentials { .. }
            | KmsError::BadCredentials { .. }
            | KmsError::NoRegion { .. }
            | KmsError::Request { .. }
            | KmsError::Protocol { .. }
            | KmsError::Service { .. }
            | KmsError::GaveUp { .. } => false,
        }
    }
}

/// The region of a KMS key or alias ARN (`arn:PARTITION:kms:REGION:ACCOUNT:key/...`), if the
/// key is one.
pub fn region_of_arn(key: &str) -> Option<&str> {
    let mut parts = key.splitn(6, ':');
    let (arn, _partition, service, region, _account, resource) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (arn == "arn" && service == "kms" && !region.is_empty() && !resource.is_empty()).then_some(region)
}

/// Builds KMS providers on demand, sharing one AWS configuration per region (so credentials
/// are resolved and cached once per region and process, not per slot).
#[derive(Debug)]
pub struct KmsFactory {
    opts: KmsOptions,
    policy: RetryPolicy,
    /// Keyed by the region a key ARN names, `None` for keys given without one. A key ARN's
    /// region goes into the loader, so the region chain (which may wait for IMDS off EC2) is
    /// never consulted for it.
    sdk: tokio::sync::Mutex<HashMap<Option<String>, SdkConfig>>,
}

impl KmsFactory {
    pub fn new(opts: KmsOptions) -> Self {
        let policy = RetryPolicy::for_deadline(opts.timeout);
        KmsFactory { opts, policy, sdk: tokio::sync::Mutex::new(HashMap::new()) }
    }

    pub fn options(&self) -> &KmsOptions {
        &self.opts
    }

    async fn sdk(&self, region: Option<&str>) -> SdkConfig {
        let mut configs = self.sdk.lock().await;
        if let Some(c) = configs.get(&region.map(str::to_owned)) {
            return c.clone();
        }
        // Our own retry loop owns the deadline; the SDK's would multiply it.
        let timeouts =
            TimeoutConfig::builder().connect_timeout(self.policy.attempt_timeout.min(Duration::from_secs(5))).build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(r) = region {
            loader = loader.region(Region::new(r.to_owned()));
        }
        let c = loader.load().await;
        configs.insert(region.map(str::to_owned), c.clone());
        c
    }

    /// A provider for `key` (a key id, key ARN, alias name or alias ARN).
    pub async fn provider(&self, key: &str) -> Result<KmsProvider, KmsError> {
        let sdk = self.sdk(region_of_arn(key)).await;
        let region = sdk.region().map(|r| r.to_string()).ok_or_else(|| KmsError::NoRegion { key: key.to_owned() })?;
        let mut conf = aws_sdk_kms::config::Builder::from(&sdk);
        if let Some(url) = &self.opts.endpoint {
            conf = conf.endpoint_url(url);
        }
        let endpoint = self
            .opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_KMS").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .unwrap_or_else(|| format!("the KMS endpoint of {region}"));
        Ok(KmsProvider { client: Client::from_conf(conf.build()), key: key.to_owned(), endpoint, policy: self.policy })
    }
}

/// One KMS key as a key provider.
#[derive(Debug, Clone)]
pub struct KmsProvider {
    client: Client,
    /// The key as given (id, ARN, alias) or, for a slot, the key ARN recorded in it.
    key: String,
    /// Where requests go, for messages.
    endpoint: String,
    policy: RetryPolicy,
}

impl KmsProvider {
    /// GenerateDataKey: a fresh 64-byte key from KMS and its ciphertext blob. The wrapped form
    /// names the key ARN KMS answered with (not the alias it may have been asked with), so
    /// later unwraps do not depend on the alias.
    pub async fn generate_data_key(&self, ctx: &EncryptionContext) -> Result<(VolumeKey, Wrapped), KmsError> {
        const OP: &str = "kms:GenerateDataKey";
        let mut out = self
            .call(OP, || {
                self.client
                    .generate_data_key()
                    .key_id(&self.key)
                    .number_of_bytes(VolumeKey::LEN as i32)
                    .set_encryption_context(Some(context_map(ctx)))
                    .send()
            })
            .await?;
        // Take the plaintext first, so that it is zeroized whatever fails next.
        let key = into_volume_key(OP, out.plaintext.take())?;
        let ciphertext = out.ciphertext_blob.take().ok_or(KmsError::Protocol { op: OP, what: "no ciphertext" })?;
        let key_id = out.key_id.take().ok_or(KmsError::Protocol { op: OP, what: "no key id" })?;
        Ok((key, Wrapped { key_id, ciphertext: ciphertext.into_inner() }))
    }

    /// Encrypt: wraps an existing key (adding a KMS slot to a volume unlocked another way).
    pub async fn encrypt(&self, key: &VolumeKey, ctx: &EncryptionContext) -> Result<Wrapped, KmsError> {
        const OP: &str = "kms:Encrypt";
        let mut out = self
            .call(OP, || {
                // The SDK takes ownership of the request's plaintext and drops it unzeroized;
                // nothing here can reach that copy (see the module documentation).
                self.client
                    .encrypt()
                    .key_id(&self.key)
                    .plaintext(Blob::new(key.expose().to_vec()))
                    .set_encryption_context(Some(context_map(ctx)))
                    .send()
            })
            .await?;
        let ciphertext = out.ciphertext_blob.take().ok_or(KmsError::Protocol { op: OP, what: "no ciphertext" })?;
        let key_id = out.key_id.take().ok_or(KmsError::Protocol { op: OP, what: "no key id" })?;
        Ok(Wrapped { key_id, ciphertext: ciphertext.into_inner() })
    }

    /// Decrypt, naming the key (so KMS refuses a blob made under another key) and passing the
    /// context recorded in the slot.
    pub async fn decrypt(&self, slot: &KeySlot) -> Result<VolumeKey, KmsError> {
        const OP: &str = "kms:Decrypt";
        let mut out = self
            .call(OP, || {
                self.client
                    .decrypt()
                    .key_id(&slot.key_id)
                    .ciphertext_blob(Blob::new(slot.wrapped.clone()))
                    .set_encryption_context(Some(context_map(&slot.context)))
                    .send()
            })
            .await?;
        into_volume_key(OP, out.plaintext.take())
    }

    /// ReEncrypt `slot` under this provider's key, inside KMS: the plaintext key never leaves
    /// it. The destination context is the slot's own, so the new slot opens the same way.
    pub async fn reencrypt_slot(&self, slot: &KeySlot) -> Result<Wrapped, KmsError> {
        const OP: &str = "kms:ReEncrypt";
        let mut out = self
            .call(OP, || {
                self.client
                    .re_encrypt()
                    .ciphertext_blob(Blob::new(slot.wrapped.clone()))
                    .source_key_id(&slot.key_id)
                    .set_source_encryption_context(Some(context_map(&slot.context)))
                    .destination_key_id(&self.key)
                    .set_destination_encryption_context(Some(context_map(&slot.context)))
                    .send()
            })
            .await?;
        let ciphertext = out.ciphertext_blob.take().ok_or(KmsError::Protocol { op: OP, what: "no ciphertext" })?;
        let key_id = out.key_id.take().ok_or(KmsError::Protocol { op: OP, what: "no key id" })?;
        Ok(Wrapped { key_id, ciphertext: ciphertext.into_inner() })
    }

    /// Runs one SDK call under the retry policy, classifying its errors.
    async fn call<T, E, F, Fut>(&self, op: &'static str, mut send: F) -> Result<T, KmsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        let started = Instant::now();
        let r = retry(&self.policy, op, &self.key, &self.endpoint, || {
            let fut = send();
            async move { fut.await.map_err(|e| classify(op, &self.key, &self.endpoint, e)) }
        })
        .await;
        // One logical call (retries included) per sample.
        // Op names are IAM actions ("kms:Decrypt"); the metric name already says kms.
        crate::metrics::kms_metrics().record(
            op.strip_prefix("kms:").unwrap_or(op),
            started.elapsed(),
            r.as_ref().map(|_| ()).map_err(KmsError::metric_code),
        );
        r
    }
}

impl KeyProvider for KmsProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn key_id(&self) -> &str {
        &self.key
    }

    fn wrap<'a>(
        &'a self,
        key: &'a VolumeKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Wrapped, KeyError>> {
        Box::pin(async move { Ok(self.encrypt(key, context).await?) })
    }

    fn unwrap<'a>(&'a self, slot: &'a KeySlot) -> BoxFuture<'a, Result<VolumeKey, KeyError>> {
        Box::pin(async move {
            if slot.provider != KIND {
                return Err(KeyError::NotMine(format!("provider {}", slot.provider)));
            }
            Ok(self.decrypt(slot).await?)
        })
    }

    fn generate<'a>(&'a self, context: &'a EncryptionContext) -> BoxFuture<'a, Result<(VolumeKey, Wrapped), KeyError>> {
        Box::pin(async move { Ok(self.generate_data_key(context).await?) })
    }
}

fn context_map(ctx: &EncryptionContext) -> HashMap<String, String> {
    ctx.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Moves KMS's plaintext into a locked key and zeroizes the SDK's buffer.
fn into_volume_key(op: &'static str, blob: Option<Blob>) -> Result<VolumeKey, KmsError> {
    let mut bytes = blob.ok_or(KmsError::Protocol { op, what: "no plaintext" })?.into_inner();
    let key = VolumeKey::from_slice(&bytes);
    bytes.zeroize();
    let key = key.ok_or(KmsError::Protocol { op, what: "a key that is not 64 bytes" })?;
    if !key.halves_differ() {
        return Err(KmsError::Protocol { op, what: "a key whose two XTS halves are equal" });
    }
    Ok(key)
}

/// Runs `attempt` until it succeeds, fails permanently, or the deadline leaves no room for
/// another attempt. Each attempt is bounded by `policy.attempt_timeout` and the time left.
pub async fn retry<T, F, Fut>(
    policy: &RetryPolicy,
    op: &'static str,
    key: &str,
    endpoint: &str,
    mut attempt: F,
) -> Result<T, KmsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KmsError>>,
{
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        let left = policy.deadline.saturating_sub(start.elapsed());
        let budget = policy.attempt_timeout.min(left);
        attempts = attempts.saturating_add(1);
        let err = match tokio::time::timeout(budget, attempt()).await {
            Ok(Ok(v)) => {
                if attempts > 1 {
                    tracing::info!(
                        op,
                        key,
                        attempts,
                        elapsed_ms = millis(start.elapsed()),
                        "KMS call succeeded after retrying"
                    );
                }
                return Ok(v);
            }
            Ok(Err(e)) => e,
            Err(_) => KmsError::Timeout { op, endpoint: endpoint.to_owned(), ms: millis(budget) },
        };
        if !err.is_transient() {
            return Err(err);
        }
        // The last pause is shortened so that one more attempt still fits before the deadline.
        let left = policy.deadline.saturating_sub(start.elapsed());
        let pause = full_jitter(policy.ceiling(attempts)).min(left.saturating_sub(MIN_ATTEMPT));
        if left <= MIN_ATTEMPT {
            return Err(KmsError::GaveUp {
                op,
                key: key.to_owned(),
                attempts,
                deadline_ms: millis(policy.deadline),
                last: Box::new(err),
            });
        }
        tracing::warn!(op, key, attempt = attempts, retry_in_ms = millis(pause), error = %err, "KMS call failed; retrying");
        tokio::time::sleep(pause).await;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A uniformly random duration in `[0, ceiling]`. Full jitter spreads the retries of many
/// hosts throttled at once; the randomness needs no cryptographic strength, but the system
/// generator is at hand.
fn full_jitter(ceiling: Duration) -> Duration {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 8];
    if SystemRandom::new().fill(&mut b).is_err() {
        return ceiling / 2;
    }
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(u64::from_le_bytes(b) % nanos.saturating_add(1))
}

/// Turns an SDK error into a [`KmsError`].
fn classify<E>(op: &'static str, key: &str, endpoint: &str, err: SdkError<E>) -> KmsError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    if let Some(c) = credentials_error(&err) {
        return c;
    }
    let detail = || crate::logging::error_chain(&err);
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            from_code(op, key, ctx.err().code(), ctx.err().message().unwrap_or(""), status)
        }
        SdkError::ResponseError(r) => {
            let status = r.raw().status().as_u16();
            if status == 429 {
                KmsError::Throttled { op, message: format!("HTTP {status}") }
            } else {
                KmsError::BadResponse { op, detail: format!("HTTP {status}: {}", detail()) }
            }
        }
        SdkError::DispatchFailure(d) if d.is_user() => KmsError::Request { op, detail: detail() },
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            KmsError::Unreachable { op, endpoint: endpoint.to_owned(), detail: detail() }
        }
        SdkError::ConstructionFailure(_) => KmsError::Request { op, detail: detail() },
        _ => KmsError::Service { op, key: key.to_owned(), message: detail() },
    }
}

/// A credential-chain failure somewhere in the error's causes.
fn credentials_error(err: &(dyn StdError + 'static)) -> Option<KmsError> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            let detail = crate::logging::error_chain(c);
            return Some(match c {
                CredentialsError::ProviderTimedOut(_) | CredentialsError::ProviderError(_) => {
                    KmsError::CredentialsUnavailable { detail }
                }
                _ => KmsError::NoCredentials { detail },
            });
        }
        cur = e.source();
    }
    None
}

/// Maps a KMS error code (the JSON `__type`) and HTTP status to a [`KmsError`]. Codes are the
/// ones the KMS API reference lists for GenerateDataKey, Decrypt, Encrypt and ReEncrypt, plus
/// the common AWS authentication errors.
pub fn from_code(op: &'static str, key: &str, code: Option<&str>, message: &str, status: u16) -> KmsError {
    let key = key.to_owned();
    // "Code: message", so that the AWS error name is always there to search for.
    let message = match (code.filter(|c| !c.is_empty()), message) {
        (Some(c), "") => c.to_owned(),
        (Some(c), m) => format!("{c}: {m}"),
        (None, "") => format!("HTTP {status}"),
        (None, m) => format!("HTTP {status}: {m}"),
    };
    match code.unwrap_or("") {
        "AccessDeniedException" => KmsError::AccessDenied { op, key, message },
        "DisabledException" => KmsError::Disabled { key, message },
        "KMSInvalidStateException" if message.to_ascii_lowercase().contains("pending deletion") => {
            KmsError::PendingDeletion { key, message }
        }
        "KMSInvalidStateException" => KmsError::InvalidState { key, message },
        "InvalidCiphertextException" => KmsError::WrongContext { key, message },
        "IncorrectKeyException" => KmsError::WrongKey { key, message },
        "NotFoundException" => KmsError::NotFound { key, message },
        "InvalidKeyUsageException" => KmsError::KeyUsage { op, key, message },
        "ThrottlingException" | "TooManyRequestsException" | "RequestLimitExceeded" | "SlowDown" => {
            KmsError::Throttled { op, message }
        }
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ServiceUnavailableException"
        | "ServiceUnavailable"
        | "InternalFailure"
        | "InternalError" => KmsError::Unavailable { op, message },
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "ExpiredTokenException"
        | "MissingAuthenticationToken"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch" => KmsError::BadCredentials { op, message },
        _ if status == 429 => KmsError::Throttled { op, message },
        _ if status >= 500 => KmsError::Unavailable { op, message },
        _ => KmsError::Service { op, key, message },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
    }

    fn fast(deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            deadline: Duration::from_millis(deadline_ms),
            attempt_timeout: Duration::from_millis(deadline_ms),
            base: Duration::from_millis(5),
            cap: Duration::from_millis(20),
        }
    }

    fn throttled() -> KmsError {
        from_code("kms:Decrypt", "k", Some("ThrottlingException"), "slow down", 400)
    }

    #[test]
    fn region_comes_from_key_and_alias_arns_only() {
        assert_eq!(region_of_arn("arn:aws:kms:eu-west-1:111122223333:key/1234"), Some("eu-west-1"));
        assert_eq!(region_of_arn("arn:aws-cn:kms:cn-north-1:111122223333:alias/x"), Some("cn-north-1"));
        assert_eq!(region_of_arn("alias/x"), None);
        assert_eq!(region_of_arn("1234abcd-12ab-34cd-56ef-1234567890ab"), None);
        assert_eq!(region_of_arn("arn:aws:s3:::bucket"), None);
        assert_eq!(region_of_arn("arn:aws:kms::111122223333:key/1"), None);
    }

    #[test]
    fn codes_map_to_typed_errors() {
        let c = |code: &str, msg: &str, status| from_code("kms:Decrypt", "k", Some(code), msg, status);
        assert!(matches!(c("AccessDeniedException", "", 400), KmsError::AccessDenied { .. }));
        assert!(matches!(c("DisabledException", "", 400), KmsError::Disabled { .. }));
        assert!(matches!(
            c("KMSInvalidStateException", "k is pending deletion.", 400),
            KmsError::PendingDeletion { .. }
        ));
        assert!(matches!(c("KMSInvalidStateException", "pending import", 400), KmsError::InvalidState { .. }));
        assert!(matches!(c("InvalidCiphertextException", "", 400), KmsError::WrongContext { .. }));
        assert!(matches!(c("NotFoundException", "", 400), KmsError::NotFound { .. }));
        assert!(matches!(c("ThrottlingException", "", 400), KmsError::Throttled { .. }));
        assert!(matches!(c("KMSInternalException", "", 500), KmsError::Unavailable { .. }));
        assert!(matches!(c("UnrecognizedClientException", "", 400), KmsError::BadCredentials { .. }));
        assert!(matches!(from_code("op", "k", None, "", 503), KmsError::Unavailable { .. }));
        assert!(matches!(from_code("op", "k", None, "", 429), KmsError::Throttled { .. }));
        assert!(matches!(from_code("op", "k", Some("Weird"), "", 400), KmsError::Service { .. }));
    }

    #[test]
    fn only_passing_failures_are_transient() {
        assert!(throttled().is_transient());
        assert!(from_code("op", "k", None, "", 500).is_transient());
        for code in ["AccessDeniedException", "DisabledException", "InvalidCiphertextException", "NotFoundException"] {
            assert!(!from_code("op", "k", Some(code), "", 400).is_transient(), "{code}");
        }
    }

    #[test]
    fn messages_say_what_to_do() {
        let m = from_code("kms:Decrypt", "arn:k", Some("DisabledException"), "is disabled", 400).to_string();
        assert!(m.contains("disabled") && m.contains("enable-key"), "{m}");
        let m = from_code("kms:Decrypt", "arn:k", Some("AccessDeniedException"), "no", 400).to_string();
        assert!(m.contains("kms:Decrypt") && m.contains("kms:EncryptionContext:nbdcrypt:volume"), "{m}");
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_cap() {
        let p = RetryPolicy::for_deadline(Duration::from_secs(30));
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(6), Duration::from_millis(3200));
        assert_eq!(p.ceiling(7), Duration::from_secs(5));
        assert_eq!(p.ceiling(1000), Duration::from_secs(5));
        assert_eq!(p.attempt_timeout, Duration::from_secs(10));
        assert_eq!(RetryPolicy::for_deadline(Duration::from_millis(500)).attempt_timeout, Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        for _ in 0..1000 {
            assert!(full_jitter(Duration::from_millis(7)) <= Duration::from_millis(7));
        }
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let r = block_on(retry(&fast(2000), "op", "k", "e", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(throttled())
                } else {
                    Ok(n)
                }
            }
        }));
        assert_eq!(r.unwrap(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = block_on(retry(&fast(2000), "op", "k", "e", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(from_code("op", "k", Some("DisabledException"), "", 400)) }
        }));
        assert!(matches!(r, Err(KmsError::Disabled { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_deadline_bounds_the_retries() {
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let r: Result<(), _> = block_on(retry(&fast(300), "op", "k", "e", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(throttled()) }
        }));
        let took = start.elapsed();
        match r {
            Err(KmsError::GaveUp { attempts, last, .. }) => {
                assert!(attempts > 3, "{attempts}");
                assert!(matches!(*last, KmsError::Throttled { .. }));
            }
            other => panic!("{other:?}"),
        }
        // The last attempt is squeezed in just before the deadline, never after it.
        assert!(took >= Duration::from_millis(240) && took < Duration::from_millis(400), "{took:?}");
    }

    #[test]
    fn a_hung_attempt_is_cut_off_and_retried() {
        let calls = AtomicU32::new(0);
        let mut p = fast(2000);
        p.attempt_timeout = Duration::from_millis(100);
        let r = block_on(retry(&p, "op", "k", "e", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok(n)
            }
        }));
        assert_eq!(r.unwrap(), 1);
    }
}
