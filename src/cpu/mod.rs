//! f32 CPU reference backend: the oracle for every GPU op and the backend for tiny models.
