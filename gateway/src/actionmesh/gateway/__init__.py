"""ActionGatewayService: authenticate, authorize twice, discover, execute, audit."""
