//! Runnel's gRPC contract, generated from `proto/runnel/v1`.
//!
//! Where it sits on the data path: every byte that crosses a process boundary
//! is described here. Clients use [`v1`]'s `Producer`, `Consumer`, `Admin` and
//! `ConsumerGroups` services; brokers talk to each other through
//! [`v1::internal`] (replica fetch, Raft RPCs, broker heartbeats).
//!
//! Besides the generated types, the crate holds the encoded file descriptor
//! set ([`FILE_DESCRIPTOR_SET`]) that servers register for gRPC reflection,
//! so tools such as `grpcurl` work without the `.proto` files, and [`wire`],
//! the framing the hot streams use to send record batches without copying
//! them into tonic's buffers.

/// Package `runnel.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("runnel.v1");

    /// Package `runnel.v1.internal`: broker-to-broker services.
    pub mod internal {
        tonic::include_proto!("runnel.v1.internal");
    }
}

pub mod wire;

/// The encoded `FileDescriptorSet` of every Runnel proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("runnel_descriptor");
