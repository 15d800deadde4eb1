//! `nulltext serve`: a local web app and HTTP API for inverting and editing photos.
