// Package payload decodes device messages: SenML JSON and SenML CBOR (RFC 8428)
// and a plain JSON object. It resolves record names relative to the sending
// device and rejects names that point at another device. JSON is read straight
// from the bytes (jsonread.go), without reflection. It knows nothing of
// transports, device kinds or stores.
package payload
