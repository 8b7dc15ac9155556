//! The prost codec with one change: a request message that does not decode (truncated bytes, invalid UTF-8
//! in a string field, ...) is the client's fault and gets `INVALID_ARGUMENT`, not tonic's `INTERNAL`. Such
//! a message never reaches validation, let alone the engine.

use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone, Default)]
pub struct ValidatingCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for ValidatingCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ValidatingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ValidatingDecoder(self.0.decoder())
    }
}

#[derive(Debug)]
pub struct ValidatingDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ValidatingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == Code::Internal {
                Status::invalid_argument(format!("malformed request message: {}", s.message()))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}
