//! Consumer groups: where they sit on the data path is beside the produce
//! path. Membership and assignment are pure state ([`assignor`],
//! [`state`]); the [`coordinator`] runtime serves the `ConsumerGroups` RPCs
//! for the groups whose `__consumer_offsets` partition this broker leads,
//! and stores commits by producing to that partition with acks=all.
//!
//! - [`assignor`]: range, round-robin, sticky and broadcast assignment.
//! - [`state`]: one group's membership state machine (join, heartbeat,
//!   leave, expiry, generations, commit fencing).
//! - [`coordinator`]: leadership following, offsets and membership replay,
//!   blocking joins, commits, describe/reset/delete.
//! - [`appender`]: the one writer per offsets partition, batching
//!   concurrent commits into one acks=all append.
//! - [`compact`]: copying an offsets partition's live records to its end
//!   and deleting the rest.
//! - [`record`]: group metadata records (membership persisted next to the
//!   offsets).

pub mod appender;
pub mod assignor;
mod compact;
pub mod coordinator;
pub mod record;
pub mod state;

pub use coordinator::{GroupCoordinator, OFFSETS_TOPIC};
