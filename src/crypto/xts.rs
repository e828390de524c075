//! (in progress)
#[derive(Debug)]
pub struct SectorCipher;
#[derive(Debug)]
pub enum CipherError {}
