//! `proto`: the gRPC services and messages between the controller, the workers
//! and the reward gateway (registration, heartbeats, prompt batches,
//! trajectories, versioned weight updates). Not built yet: issue 6 defines them.
