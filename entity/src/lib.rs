//! sea-orm entities for the tables clawfleet reads and writes.
//!
//! `desired_containers` is written by other services (and by clawfleet's own
//! CLI/API, the same way); `container_status` only by the controller;
//! `desired_deletions` only by the database's own triggers. The schema itself
//! lives in the `clawfleet-migration` crate; these types mirror it.
//!
//! The controller never decodes `desired_containers` through [`desired_containers::Model`]:
//! rows written by others may hold anything (text in an integer column on
//! SQLite, a broken timestamp), and one bad row must not stop the others
//! being read. The store decodes those rows column by column instead; the
//! entity is used for writes.

pub mod container_status;
pub mod desired_containers;
pub mod desired_deletions;
