"""The cloud side over ZeroMQ: broker, content manager (device state in shared memory), workers."""
