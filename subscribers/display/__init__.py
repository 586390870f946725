"""The live display (a web page that reads the pose stream straight from Mosquitto over
WebSockets) and the offline renderer (poses or a recorded stream -> GIF / MP4).

    python -m subscribers.display --broker-ws ws://pi.local:9001 --password-file creds.json
    python -m subscribers.display.render poses.npy --out dance.gif
"""
